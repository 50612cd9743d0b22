"""The pretext-task family (issue 13): RotNet's exact rotations and labels, its loss against a slow
per-image reference, and a few epochs on digits beating the random-init encoder."""
import torch

from conftest import knn_after_pretrain, make_cfg
from selfsup.engine.contract import Batch
from selfsup.methods.rotnet import rotate_batch
from selfsup.engine.loop import build_method



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


def block_maps(name, size):
    """Each probe point's output shape of backbone ``name`` on a (1, 3, size, size) input."""
    from selfsup.models.backbones import build_backbone
    from selfsup.models.backbones import probe_points

    net = build_backbone(name, 3).eval()
    shapes = {}
    for n, m in probe_points(net).items():
        m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
    with torch.no_grad():
        net(torch.randn(1, 3, size, size))
    return net, shapes


def test_rotnet_cifar_nin_keeps_blocks_3_and_4_at_8x8():
    """RotNet's CIFAR config (use_avg_on_conv3 False): max-pool after block 1, average pool after block 2
    only, so a 32 px image gives 16, 8, 8, 8; ``nin`` keeps the class default (pool after block 3)."""
    net, maps = block_maps("nin_rotnet", 32)
    assert maps == {"block1": (96, 16, 16), "block2": (192, 8, 8), "block3": (192, 8, 8), "block4": (192, 8, 8)}
    pools = [[type(m).__name__ for m in b if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
             for b in net.trunk.blocks]
    assert pools == [["MaxPool2d"], ["AvgPool2d"], [], []]
    assert block_maps("nin", 32)[1]["block3"] == (192, 4, 4)


def test_rotnet_alexnet_is_the_official_one():
    """architectures/AlexNet.py: conv 64-192-384-256-256 each with BN, fc6 / fc7 Linear (no bias) - BN -
    ReLU without dropout; the output is fc7 after its ReLU (4096-d)."""
    net, maps = block_maps("alexnet_rotnet", 224)
    assert [c for c, *_ in maps.values()] == [64, 192, 384, 256, 256]
    assert [hw for _, *hw in maps.values()] == [[55, 55], [27, 27], [13, 13], [13, 13], [13, 13]]
    fc = list(net.trunk.classifier)
    assert [type(m).__name__ for m in fc] == ["Linear", "BatchNorm1d", "ReLU"] * 2
    assert fc[0].in_features == 256 * 6 * 6 and fc[0].bias is None and fc[3].bias is None
    assert net.out_dim == 4096 and not net.relu_head


def test_pad_crop_is_torchvisions_random_crop_with_padding(digits):
    """rotnet.pad_crop: RandomCrop(S, padding=p) per image, the padding a 0 pixel (normalised), against a
    per-image reference with the same offsets; the view itself is not resized-cropped."""
    from selfsup.methods.rotnet import pad_crop

    x = torch.randn(5, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    torch.manual_seed(2)
    out = pad_crop(x, 4, fill)
    torch.manual_seed(2)
    off = torch.randint(0, 9, (5, 2))
    for i in range(5):
        big = torch.stack([torch.nn.functional.pad(x[i, c], (4, 4, 4, 4), value=float(fill[c])) for c in range(3)])
        top, left = off[i].tolist()
        assert torch.equal(out[i], big[:, top:top + 8, left:left + 8])
    cfg = make_cfg(methods=["rotnet"], rotnet={"pad_crop": 4, "augment": "crop_flip"})
    m = build_method(cfg, "rotnet", digits)
    spec = m.view_specs()[0]
    assert not spec.crop and spec.flip_p == 0.5
    assert torch.allclose(m.pad_fill, -torch.tensor(digits.meta["mean"]) / torch.tensor(digits.meta["std"]))


# ----------------------------------------------------------------- jigsaw
def greedy_reference(n, tiles, first):
    """The max_min rule written out slowly: each step scans every permutation and keeps the first whose
    minimum Hamming distance to the chosen set is largest."""
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


def algorithm1_reference(n, tiles, first):
    """The paper's Algorithm 1 as bbrattoli/JigsawPuzzlePytorch@ec85994 select_permutations.py runs it
    (--selection max), written out slowly: the chosen permutation leaves the candidate list; the next is
    the first remaining candidate of largest mean Hamming distance to the chosen set."""
    import itertools

    left = list(itertools.permutations(range(tiles)))
    chosen = [left.pop(first)]
    while len(chosen) < n:
        mean = [sum(sum(a != b for a, b in zip(p, q)) for q in chosen) / len(chosen) for p in left]
        chosen.append(left.pop(mean.index(max(mean))))
    return chosen


def hamming_stats(perms):
    """(mean, minimum) Hamming distance over the distinct pairs of a set."""
    import numpy as np

    p = np.asarray(perms)
    d = (p[:, None, :] != p[None, :, :]).sum(-1)
    off = d[~np.eye(len(p), dtype=bool)]
    return float(off.mean()), int(off.min())


def test_permutation_set_is_algorithm_1():
    import math

    import numpy as np

    from selfsup.methods.jigsaw import permutation_set

    for tiles, n, seed in ((4, 6, 3), (5, 12, 3), (6, 9, 1)):
        first = int(np.random.default_rng(seed).integers(math.factorial(tiles)))
        ours = permutation_set(n, tiles=tiles, seed=seed)
        assert [tuple(p) for p in ours] == algorithm1_reference(n, tiles, first)
        old = permutation_set(n, tiles=tiles, seed=seed, rule="max_min")  # the earlier rule stays reachable
        assert [tuple(p) for p in old] == greedy_reference(n, tiles, first)
    # 100 of the 9!: the statistics of the official set MehdiNoroozi/JigsawPuzzleSolver@8041c58
    # permutations_100_max.bin (mean Hamming distance 8.08 over its pairs, minimum 2)
    big = permutation_set(100)
    assert len({tuple(p) for p in big}) == 100
    mean, low = hamming_stats(big)
    assert abs(mean - 8.08) < 0.005 and low == 2, (mean, low)
    assert hamming_stats(permutation_set(100, rule="max_min"))[1] >= 6  # max_min: far apart, lower mean


def test_tile_normalisation_modes():
    from selfsup.methods.jigsaw import normalise_tiles

    torch.manual_seed(0)
    t = torch.randn(2, 9, 3, 5, 5) * 3 + torch.randn(2, 9, 3, 1, 1)
    for b, k in ((0, 0), (1, 7)):
        tile = t[b, k]  # (3, 5, 5)
        # the Caffe data layer: each channel's own mean subtracted, no scaling
        cm = normalise_tiles(t, "channel_mean")[b, k]
        assert torch.allclose(cm, tile - tile.mean((1, 2), keepdim=True), atol=1e-6)
        # the PyTorch loader: each channel to mean 0 and (unbiased) standard deviation 1
        cs = normalise_tiles(t, "channel_mean_std")[b, k]
        for c in range(3):
            ref = (tile[c] - tile[c].mean()) / tile[c].std()
            assert torch.allclose(cs[c], ref, atol=1e-5)
        ms = normalise_tiles(t, "mean_std")[b, k]  # the earlier rule: over all channels
        assert torch.allclose(ms, (tile - tile.mean()) / (tile.std() + 1e-5), atol=1e-5)
    flat = torch.ones(1, 1, 3, 4, 4)
    assert torch.equal(normalise_tiles(flat, "channel_mean_std"), torch.zeros_like(flat))  # a 0 std stays 1


def test_tile_jitter_shifts_each_channel_by_whole_grey_levels():
    from selfsup.methods.jigsaw import jitter_tiles

    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    pix = torch.rand(64, 9, 3, 4, 4) * 0.8 + 0.1  # (B, K, C, t, t) in [0.1, 0.9]: no clipping
    pix[0, 0, 0] = 1.0  # one saturated channel: clipped at white
    norm = (pix - mean.view(1, 1, 3, 1, 1)) / std.view(1, 1, 3, 1, 1)
    torch.manual_seed(1)
    out = jitter_tiles(norm, 2, mean, std) * std.view(1, 1, 3, 1, 1) + mean.view(1, 1, 3, 1, 1)
    shift = (out - pix) * 255  # grey levels
    levels = shift[..., 0, 0].round()  # (B, K, C): one level per tile and channel
    assert torch.allclose(shift[1:], levels[1:, :, :, None, None].expand_as(shift[1:]), atol=1e-3)
    assert set(levels[1:].flatten().tolist()) == {-2.0, -1.0, 0.0, 1.0}  # np.random.randint(-2, 2)
    assert float(out[0, 0, 0].max()) <= 1.0 + 1e-6


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
    cfg = make_cfg(methods=["jigsaw"], jigsaw={"permutations": 20, "view_size": 24, "tile_size": 7, "tile_fc": 16})
    m = build_method(cfg, "jigsaw", digits).eval()
    mean, std = float(m.pix_mean[0]), float(m.pix_std[0])
    assert abs(mean - digits.meta["mean"][0]) < 1e-6 and abs(std - digits.meta["std"][0]) < 1e-6
    x = torch.rand(4, 1, 24, 24) * (1 - mean) / std  # normalised pixels, none below 0 once jittered
    torch.manual_seed(5)
    out = m(Batch([x], torch.zeros(4, dtype=torch.long), torch.arange(4)))
    torch.manual_seed(5)  # the same draws, by hand: offsets, labels, then the jitter levels
    off = torch.randint(0, 2, (4, 9, 2))
    label = torch.randint(0, 20, (4,))
    levels = torch.randint(-2, 2, (4, 9, 1, 1, 1))
    losses = []
    with torch.no_grad():
        for b in range(4):
            tiles = []
            for i in m.perms[label[b]].tolist():  # position j shows the tile of cell perm[j]
                r, c = divmod(i, 3)
                y0, x0 = 8 * r + int(off[b, i, 0]), 8 * c + int(off[b, i, 1])
                p = (x[b, :, y0:y0 + 7, x0:x0 + 7] * std + mean + levels[b, i, 0] / 255).clamp(0, 1)
                t = (p - mean) / std
                tiles.append(t - t.mean())  # the Caffe rule: the tile's own channel mean subtracted
            f = m.tile_head(m.backbone(torch.stack(tiles)))  # (9, 16): fc6 per tile
            logits = m.head(f.reshape(1, -1))
            losses.append(torch.nn.functional.cross_entropy(logits, label[b:b + 1]))
    assert torch.allclose(out.loss, torch.stack(losses).mean(), atol=1e-5)


def test_jigsaw_tile_network_is_the_cfn():
    """alexnet_cfn on 64 px tiles: conv1 11 x 11 stride 2, CaffeNet's LRN and groups, Caffe's ceil pooling
    so conv5 is 6 x 6 and pool5 3 x 3 (2304-d); the head: fc6 1024 per tile (ReLU, dropout), fc7 on
    the nine concatenated, fc8 per permutation; biases at lr x2 (bias_lr_mult)."""
    from selfsup.methods.jigsaw import Jigsaw, JigsawCfg
    from selfsup.models.backbones import build_backbone

    net = build_backbone("alexnet_cfn", 3).eval()
    convs = [m for m in net.trunk.features if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.groups) for m in convs] == [
        (96, 11, 2, 0, 1), (256, 5, 1, 2, 2), (384, 3, 1, 1, 1), (384, 3, 1, 1, 2), (256, 3, 1, 1, 2)]
    assert sum(isinstance(m, torch.nn.LocalResponseNorm) for m in net.trunk.features) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    maps = []
    for m in net.trunk.features:
        if isinstance(m, torch.nn.ReLU):
            m.register_forward_hook(lambda mod, i, o: maps.append(tuple(o.shape[2:])))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert maps == [(27, 27), (13, 13), (6, 6), (6, 6), (6, 6)] and out.shape == (2, 2304)
    assert tuple(net.trunk.features[:-1](torch.randn(1, 3, 64, 64)).shape[2:]) == (6, 6)  # before pool5
    assert tuple(net.trunk.features(torch.randn(1, 3, 64, 64)).shape[2:]) == (3, 3)  # pool5: not degenerate
    cfg = JigsawCfg(permutations=10, hidden=64, bias_lr_mult=2.0)  # fc7: 4096 in the presets
    m = Jigsaw(net, cfg, 0)
    fc6 = list(m.tile_head)
    assert [type(v) for v in fc6] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout]
    assert (fc6[0].in_features, fc6[0].out_features, fc6[2].p) == (2304, 1024, 0.5)
    lin = [v for v in m.head if isinstance(v, torch.nn.Linear)]
    assert [(v.in_features, v.out_features) for v in lin] == [(9 * 1024, 64), (64, 10)]
    assert [type(v) for v in m.head][1:4] == [torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    biases = {id(v.bias) for v in m.modules() if isinstance(v, (torch.nn.Conv2d, torch.nn.Linear))}
    for g in m.param_groups():
        assert (g.get("lr_scale", 1.0) == 2.0) == all(id(p) in biases for p in g["params"])


# the digits defaults of params.yaml (a batch-normalised head, lr 0.01, mild crops: see its comments)
DIGITS = {"epochs": 5, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "augment": "crop",
          "crop_scale": [0.9, 1.0], "view_size": 24, "head_bn": True}
# jigsaw's digits settings beyond those (presets/digits.yaml): no per-tile fc6 and no dropout
JIGSAW_DIGITS = {"permutations": 100, "tile_size": 7, "tile_fc": 0, "dropout": 0.0}


def test_jigsaw_learns_its_pretext_task_and_beats_random_init_on_digits(tmp_path, digits):
    """Five epochs: the permutation accuracy rises far above chance (1 / 100), the loss falls and the
    kNN of the tile-trained trunk beats the random-init encoder's."""
    rand, _ = knn_after_pretrain("random", digits, tmp_path)
    jig, hist = knn_after_pretrain("jigsaw", digits, tmp_path, jigsaw={**DIGITS, **JIGSAW_DIGITS})
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

    cfg = make_cfg(methods=["relloc"], relloc={"view_size": 24, "patch_size": 6, "patch_jitter": 1,
                                               "pairs_per_image": "centre", "loss_reduction": "mean",
                                               "patch_norm": False, "pixelation_p": 0.0})
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
    # the digits choices of presets/digits.yaml beyond DIGITS (one centre pair, the mean loss, no pixelation)
    rel, hist = knn_after_pretrain("relloc", digits, tmp_path, relloc={
        **DIGITS, "pairs_per_image": "centre", "loss_reduction": "mean", "pixelation_p": 0.0})
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["pretext_acc"] > 1 / 8
    assert rel > rand + 2.0, (rel, rand)
