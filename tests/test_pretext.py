"""The pretext-task family (issue 13): RotNet's exact rotations and labels, its loss against a slow
per-image reference, and a few epochs on digits beating the random-init encoder."""
import torch

from conftest import knn_after_pretrain, make_cfg
from selfsup.methods.base import Batch
from selfsup.methods.rotnet import rotate_batch
from selfsup.train import build_method



def test_rotations_are_exact_and_labelled():
    x = torch.randn(3, 2, 5, 5)
    xs, y = rotate_batch(x)
    assert xs.shape == (12, 2, 5, 5) and y.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    ccw90 = x.transpose(-1, -2).flip(-2)  # a quarter turn counter-clockwise, by hand
    assert torch.equal(xs[:3], x) and torch.equal(xs[3:6], ccw90)
    assert torch.equal(xs[6:9], x.flip(-1).flip(-2))  # half turn
    for k in range(4):  # turning back by k quarters recovers the image
        assert torch.equal(torch.rot90(xs[3 * k:3 * k + 3], -k, dims=(2, 3)), x)


def test_rotnet_loss_matches_a_per_image_reference(digits):
    cfg = make_cfg(methods=["rotnet"])
    m = build_method(cfg, "rotnet", digits).eval()  # eval: BN statistics do not depend on the batch
    x = torch.randn(6, 1, 8, 8)
    out = m(Batch([x], torch.zeros(6, dtype=torch.long), torch.arange(6)))
    ref = []
    with torch.no_grad():
        for i in range(6):
            for k in range(4):
                logits = m.head(m.backbone(torch.rot90(x[i:i + 1], k, dims=(2, 3))))
                ref.append(torch.nn.functional.cross_entropy(logits, torch.tensor([k])))
    assert torch.allclose(out.loss, torch.stack(ref).mean(), atol=1e-5)
    assert 0.0 <= float(out.logs["pretext_acc"]) <= 1.0


def test_rotnet_beats_random_init_on_digits(digits, tmp_path):
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    rot, hist = knn_after_pretrain("rotnet", digits, tmp_path, rotnet={
        "epochs": 6, "batch_size": 32, "lr": 0.1, "nesterov": True, "crop_scale": [0.5, 1.0], "head": "mlp"})
    assert hist[-1]["pretext_acc"] > hist[0]["pretext_acc"] and hist[-1]["loss"] < hist[0]["loss"]
    assert rot > rand + 2.0, (rot, rand)


# ----------------------------------------------------------------- jigsaw
def greedy_reference(n, tiles, first):
    """The paper's greedy construction written out slowly: each step scans every permutation and
    keeps the first whose minimum Hamming distance to the chosen set is largest."""
    import itertools

    perms = list(itertools.permutations(range(tiles)))
    chosen = [perms[first]]
    while len(chosen) < n:
        best, best_d = None, -1
        for p in perms:
            d = min(sum(a != b for a, b in zip(p, q)) for q in chosen)
            if d > best_d:
                best, best_d = p, d
        chosen.append(best)
    return chosen


def min_pairwise_hamming(perms):
    import numpy as np

    p = np.asarray(perms)
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    return int(d[~np.eye(len(p), dtype=bool)].min())


def test_permutation_set_is_the_greedy_maximal_hamming_set():
    import numpy as np

    from selfsup.methods.jigsaw import max_hamming_permutations

    for tiles, n in ((4, 6), (5, 12)):
        ours = max_hamming_permutations(n, tiles=tiles, seed=3)
        first = int(np.random.default_rng(3).integers(int(np.prod(range(1, tiles + 1)))))
        ref = greedy_reference(n, tiles, first)
        assert [tuple(p) for p in ours] == ref
        assert min_pairwise_hamming(ours) == min_pairwise_hamming(ref)
    big = max_hamming_permutations(100)  # 3 x 3: every permutation distinct, far apart
    assert len({tuple(p) for p in big}) == 100 and min_pairwise_hamming(big) >= 6


def test_tiles_follow_the_grid_geometry():
    from selfsup.methods.jigsaw import cut_tiles

    x = torch.randn(2, 3, 24, 24)
    off = torch.randint(0, 2, (2, 9, 2))
    tiles = cut_tiles(x, 7, off)
    assert tiles.shape == (2, 9, 3, 7, 7)
    for b in range(2):
        for i in range(9):
            r, c = divmod(i, 3)
            y0, x0 = 8 * r + int(off[b, i, 0]), 8 * c + int(off[b, i, 1])
            assert torch.equal(tiles[b, i], x[b, :, y0:y0 + 7, x0:x0 + 7])


def test_jigsaw_loss_matches_a_reference(digits):
    cfg = make_cfg(methods=["jigsaw"], jigsaw={"permutations": 20, "view_size": 24, "tile_size": 7})
    m = build_method(cfg, "jigsaw", digits).eval()
    x = torch.randn(4, 1, 24, 24)
    torch.manual_seed(5)
    out = m(Batch([x], torch.zeros(4, dtype=torch.long), torch.arange(4)))
    torch.manual_seed(5)  # the same draws, by hand
    off = torch.randint(0, 2, (4, 9, 2))
    label = torch.randint(0, 20, (4,))
    losses = []
    with torch.no_grad():
        for b in range(4):
            tiles = []
            for i in m.perms[label[b]].tolist():  # position j shows the tile of cell perm[j]
                r, c = divmod(i, 3)
                y0, x0 = 8 * r + int(off[b, i, 0]), 8 * c + int(off[b, i, 1])
                t = x[b, :, y0:y0 + 7, x0:x0 + 7]
                tiles.append((t - t.mean()) / (t.std() + 1e-5))
            f = m.backbone(torch.stack(tiles))  # (9, D)
            logits = m.head(f.reshape(1, -1))
            losses.append(torch.nn.functional.cross_entropy(logits, label[b:b + 1]))
    assert torch.allclose(out.loss, torch.stack(losses).mean(), atol=1e-5)


# the digits defaults of params.yaml (a batch-normalised head, lr 0.01, mild crops: see its comments)
DIGITS = {"epochs": 5, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "augment": "crop",
          "crop_scale": [0.9, 1.0], "view_size": 24, "head_bn": True}


def test_jigsaw_learns_its_pretext_task_and_beats_random_init_on_digits(tmp_path, digits):
    """Five epochs: the permutation accuracy rises far above chance (1 / 100), the loss falls and the
    kNN of the tile-trained trunk beats the random-init encoder's."""
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    jig, hist = knn_after_pretrain("jigsaw", digits, tmp_path, jigsaw={**DIGITS, "permutations": 100, "tile_size": 7})
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["pretext_acc"] > 0.3 > 1 / 100
    assert jig > rand + 1.0, (jig, rand)


# ----------------------------------------------------------------- relative patch location
def test_relative_location_labels_follow_the_grid_geometry(digits):
    from selfsup.methods.relloc import NEIGHBOURS, neighbour_offset

    assert [neighbour_offset(k) for k in range(8)] == [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0),
                                                      (1, 1)]
    m = build_method(make_cfg(methods=["relloc"], relloc={"view_size": 24, "patch_jitter": 1}), "relloc", digits)
    assert m.geometry(24) == (8, 5, 1)  # 8 px cells, 96/144 of them, the chosen jitter
    # each cell of the view holds its own index: a patch shows which cell it came from
    x = torch.arange(9, dtype=torch.float32).view(3, 3).repeat_interleave(8, 0).repeat_interleave(8, 1)
    x = x.expand(64, 1, 24, 24).clone()
    torch.manual_seed(0)
    pairs, label = m.sample_pairs(x)  # (64, 2, 1, 5, 5), (64,)
    assert pairs.shape == (64, 2, 1, 5, 5) and set(label.tolist()) == set(range(8))
    assert bool((pairs[:, 0] == 4).all())  # the first of every pair is the centre cell
    for b in range(64):
        cell = int(pairs[b, 1].unique().item())  # the neighbour patch lies inside one cell
        assert cell == NEIGHBOURS[int(label[b])]
        dr, dc = neighbour_offset(int(label[b]))
        assert divmod(cell, 3) == (1 + dr, 1 + dc)


def test_relative_location_loss_matches_a_reference(digits):
    from selfsup.methods.relloc import NEIGHBOURS

    cfg = make_cfg(methods=["relloc"], relloc={"view_size": 24, "patch_size": 6, "patch_jitter": 1})
    m = build_method(cfg, "relloc", digits).eval()
    x = torch.randn(4, 1, 24, 24)
    torch.manual_seed(7)
    out = m(Batch([x], torch.zeros(4, dtype=torch.long), torch.arange(4)))
    torch.manual_seed(7)  # the same draws, by hand: labels, then every cell's jitter
    label = torch.randint(0, 8, (4,))
    off = 1 + torch.randint(-1, 2, (4, 9, 2))  # (cell - patch) // 2 = 1
    losses = []
    with torch.no_grad():
        for b in range(4):
            patches = []
            for i in (4, NEIGHBOURS[int(label[b])]):
                r, c = divmod(i, 3)
                y0, x0 = 8 * r + int(off[b, i, 0]), 8 * c + int(off[b, i, 1])
                patches.append(x[b, :, y0:y0 + 6, x0:x0 + 6])
            f = m.backbone(torch.stack(patches))  # (2, D)
            logits = m.head(f.reshape(1, -1))
            losses.append(torch.nn.functional.cross_entropy(logits, label[b:b + 1]))
    assert torch.allclose(out.loss, torch.stack(losses).mean(), atol=1e-5)


def test_chromatic_aberration_guards():
    from selfsup.methods.relloc import drop_colours, project_green_magenta

    x = torch.randn(5, 3, 6, 6)
    p = project_green_magenta(x)
    axis = torch.tensor([-1.0, 2.0, -1.0]) / 6 ** 0.5
    assert torch.allclose(torch.einsum("bchw,c->bhw", p, axis), torch.zeros(5, 6, 6), atol=1e-5)
    assert torch.allclose(project_green_magenta(p), p, atol=1e-5)  # a projection
    grey = torch.randn(5, 1, 6, 6).expand(5, 3, 6, 6)
    assert torch.allclose(project_green_magenta(grey), grey, atol=1e-5)  # grey is untouched
    torch.manual_seed(0)
    d = drop_colours(x)
    for b in range(5):  # exactly one channel kept as it was, the others small noise
        kept = [c for c in range(3) if torch.equal(d[b, c], x[b, c])]
        assert len(kept) == 1
        others = [c for c in range(3) if c != kept[0]]
        assert float(d[b, others].std()) < float(x[b, kept[0]].std()) / 20


def test_relative_location_beats_random_init_on_digits(tmp_path, digits):
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    rel, hist = knn_after_pretrain("relloc", digits, tmp_path, relloc=DIGITS)
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["pretext_acc"] > 1 / 8
    assert rel > rand + 2.0, (rel, rand)
