"""BEiT (selfsup/methods/beit.py) and its visual tokeniser (selfsup/models/tokenizer.py, stages/tokenizer.py): token
ids of the ViT's patch grid in the vocabulary, an exact file round trip (weights_only), a short VQ-VAE
training that lowers its reconstruction error and uses many codes, the DALL-E encoder's shapes with random
weights (no real weights here) and its state_dict layout, the stage end to end, BEiT's loss against a slow
reference, unmasked targets ignored, a frozen tokeniser, an exact resume, and a short digits run."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, assert_resume_is_exact, make_cfg
from selfsup.core.config import ConfigError
from selfsup.data.prepared import Data, Split
from selfsup.core.io import InputError
from selfsup.engine.contract import Batch, TrainContext
from selfsup.models.backbones import build_backbone
from selfsup.models.tokenizer import (DalleEncoder, DalleTokenizer, VQTokenizer, check_patch_against, dalle_tokenizer,
                               load_tokenizer, map_pixels, save_tokenizer, tokenizer_cfg, train_tokenizer)
from selfsup.engine.loop import build_method, pretrain

CPU = torch.device("cpu")
# the digits tokeniser (params.yaml's tokenizer block, fewer epochs) and BEiT block
TOK = {"kind": "vq", "patch": 2, "vocab": 64, "hidden": 32, "dim": 16, "epochs": 3, "batch_size": 64, "lr": 2e-3,
       "crop_scale": [0.5, 1.0], "flip": False}
BEIT = {"backbone": "vit_digits", "epochs": 2, "batch_size": 64, "lr": 3e-3, "warmup_epochs": 0, "augment": "crop",
        "crop_scale": [0.5, 1.0], "jitter": [0.4, 0.4, 0.4, 0.0], "jitter_p": 1.0, "vocab": 64, "mask_ratio": 0.4,
        "min_block": 4}


def small(digits, n=256):
    return Data(Split(digits.train.x[:n], digits.train.y[:n]), digits.test, {**digits.meta, "n_train": n})


def random_vq(meta, vocab=64, patch=2):
    torch.manual_seed(0)
    return VQTokenizer(patch, vocab, meta["channels"], meta["mean"], meta["std"], hidden=16, dim=8).eval()


@pytest.fixture
def tok_file(digits, tmp_path):
    """An untrained (random) vq tokeniser of the digits, saved: enough for BEiT's mechanics."""
    path = tmp_path / "tokenizer.pt"
    save_tokenizer(path, random_vq(digits.meta))
    return path


def beit(digits, tok_file, **over):
    cfg = make_cfg(methods={"beit": str(tok_file)}, beit={**BEIT, **over})
    m = build_method(cfg, "beit", digits)
    m.on_epoch_start(0, TrainContext(data=digits, device=CPU, seed=0, upstream=tok_file))
    return m


# ----------------------------------------------------------------- the tokeniser
def test_vq_ids_are_one_per_vit_patch_in_the_vocabulary_and_survive_the_file(digits, tmp_path):
    tok = random_vq(digits.meta, vocab=64)
    vit = build_backbone("vit_digits", 1, image_size=8).trunk
    for h, w in [(8, 8), (8, 12), (9, 11), (6, 6)]:  # odd sides: both drop the remainder
        x = torch.randn(3, 1, h, w)
        ids = tok.encode(x)
        g = vit.vit.conv_proj(x).shape[2:]
        assert ids.shape == (3, g[0] * g[1]) and tok.grid(h, w) == tuple(g)
        assert ids.dtype == torch.long and 0 <= int(ids.min()) and int(ids.max()) < 64
    # patch 16 on 224 px: 14 x 14, as ViT-B/16
    assert VQTokenizer(16, 32, 3, [0.5] * 3, [0.5] * 3, 8, 4).encode(torch.randn(1, 3, 224, 224)).shape == (1, 196)
    # the file: a plain dict of tensors and Python values, weights_only; the same ids after loading
    x = torch.randn(5, 1, 8, 8)
    save_tokenizer(tmp_path / "t.pt", tok, {"final_mse": 0.5})
    raw = torch.load(tmp_path / "t.pt", weights_only=True)
    assert raw["kind"] == "vq" and raw["spec"]["vocab_size"] == 64 and raw["metrics"] == {"final_mse": 0.5}
    # the run's seconds stay out of the file: the same weights write the same bytes (BEiT's key hashes them)
    save_tokenizer(tmp_path / "t2.pt", tok, {"final_mse": 0.5, "seconds": 12.3})
    assert (tmp_path / "t2.pt").read_bytes() == (tmp_path / "t.pt").read_bytes()
    back = load_tokenizer(tmp_path / "t.pt")
    assert torch.equal(back.encode(x), tok.encode(x)) and not back.training
    assert not any(p.requires_grad for p in back.parameters())
    # a file that is not a tokeniser fails with its name
    torch.save({"weights": torch.zeros(3)}, tmp_path / "junk.pt")
    with pytest.raises(InputError, match="junk.pt"):
        load_tokenizer(tmp_path / "junk.pt")


def test_vq_training_lowers_the_reconstruction_error_and_uses_many_codes(digits):
    tok, m = train_tokenizer(digits, tokenizer_cfg(TOK), CPU)
    h = m["history"]
    assert len(h) == 3 and h[-1]["mse"] < 0.5 * h[0]["mse"], h
    assert m["final_used_codes"] > 16 and m["final_perplexity"] > 8.0 and m["test_used_codes"] > 1
    assert np.isfinite(m["test_mse"]) and m["test_mse"] < h[0]["mse"]
    ids = tok.encode(torch.randn(4, 1, 8, 8))
    assert ids.shape == (4, 16) and not tok.training


def test_vq_training_is_reproducible(digits, tmp_path):
    """Seeded init, crops and code re-seeding: the same file twice (DVC sees no change downstream)."""
    for run in ("a", "b"):
        tok, m = train_tokenizer(small(digits, 256), tokenizer_cfg({**TOK, "epochs": 1}), CPU)
        save_tokenizer(tmp_path / f"{run}.pt", tok, {k: v for k, v in m.items() if k != "seconds"})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_tokenizer_config_names_the_key():
    with pytest.raises(ConfigError, match="tokenizer.bogus"):
        tokenizer_cfg({"bogus": 1})
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        tokenizer_cfg({"kind": "gumbel"})
    with pytest.raises(ConfigError, match="tokenizer.path"):
        tokenizer_cfg({"kind": "dalle"})
    with pytest.raises(ConfigError, match="tokenizer.patch"):
        tokenizer_cfg({"patch": 6})
    with pytest.raises(ConfigError, match="tokenizer.patch"):  # the ViT BEiT trains has 2 px patches
        check_patch_against(tokenizer_cfg({"patch": 4}), {"beit": {"backbone": "vit_digits"}})
    check_patch_against(tokenizer_cfg({"patch": 16}), {"model": {"backbone": "vit_base"}})


def test_dalle_encoder_with_random_weights_gives_196_ids_of_8192():
    torch.manual_seed(0)
    enc = DalleEncoder()  # the official sizes: n_hid 256, 2 blocks per group, vocab 8192
    sd = enc.state_dict()  # the official module's parameter names, so its weights load as they are
    assert {"blocks.input.w", "blocks.group_2.block_1.id_path.w", "blocks.group_4.block_2.res_path.conv_4.b",
            "blocks.output.conv.w"} <= set(sd) and "blocks.group_1.block_1.id_path.w" not in sd
    assert sd["blocks.output.conv.w"].shape == (8192, 2048, 1, 1) and sd["blocks.input.w"].shape == (256, 3, 7, 7)
    tok = DalleTokenizer(16, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], enc).eval()
    x = torch.randn(2, 3, 224, 224)
    assert tok.pixels(x).shape == (2, 3, 112, 112)  # BEiT's second 112 px view for 14 x 14 tokens
    ids = tok.encode(x)
    assert ids.shape == (2, 196) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 8192 and tok.vocab_size == 8192


def test_dalle_weights_file_converts_and_round_trips(tmp_path):
    torch.manual_seed(0)
    enc = DalleEncoder(n_hid=64, vocab_size=512)  # the official validators' smallest sizes: a cheap stand-in
    torch.save(enc.state_dict(), tmp_path / "dalle_encoder.pt")  # what the user's one-line conversion writes
    tok = dalle_tokenizer(tmp_path / "dalle_encoder.pt", 8, 1, [0.3], [0.4]).eval()  # grayscale, 8 px patches
    x = torch.randn(3, 1, 16, 24)
    # no resize at 8 px per token: the pixels are the unnormalised image, clamped, RGB, map_pixels'd
    ref = map_pixels((x * 0.4 + 0.3).clamp(0, 1)).expand(-1, 3, -1, -1)
    assert torch.allclose(tok.pixels(x), ref) and float(tok.pixels(x).min()) >= 0.1 - 1e-6
    ids = tok.encode(x)
    assert ids.shape == (3, 6) and torch.equal(ids, enc(ref).argmax(1).flatten(1))
    save_tokenizer(tmp_path / "t.pt", tok)
    assert torch.equal(load_tokenizer(tmp_path / "t.pt").encode(x), ids)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "junk.pt")
    with pytest.raises(InputError, match="junk.pt"):
        dalle_tokenizer(tmp_path / "junk.pt", 8, 1, [0.3], [0.4])


def test_tokenizer_stage_end_to_end(digits_folder, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset").symlink_to(digits_folder, target_is_directory=True)
    params = {"methods": {"beit": "data/tokenizer/tokenizer.pt"}, "device": "cpu",
              "beit": {"backbone": "vit_digits", "vocab": 64}, "tokenizer": {**TOK, "epochs": 1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "tokenizer.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(tmp_path / "data" / "tokenizer" / "tokenizer.pt")
    assert tok.kind == "vq" and tok.vocab_size == 64 and tok.patch == 2
    m = json.loads((tmp_path / "metrics" / "tokenizer.json").read_text())
    assert {"final_mse", "final_used_codes", "final_perplexity", "test_mse", "history", "seconds"} <= set(m)
    # a bad key stops the stage before any work, naming it (in-process: the same main())
    params["tokenizer"]["vocab_size"] = 64
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        stage_module().main(tmp_path)


def stage_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tokenizer_stage", ROOT / "stages" / "tokenizer.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def test_tokenizer_stage_converts_dalle_weights(digits_folder, tmp_path):
    """kind dalle: the user's weights file wrapped with the dataset's normalisation (in-process main())."""
    stage = stage_module()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset").symlink_to(digits_folder, target_is_directory=True)
    torch.manual_seed(0)
    torch.save(DalleEncoder(n_hid=64, vocab_size=512).state_dict(), tmp_path / "dalle_encoder.pt")
    params = {"methods": ["random"], "device": "cpu", "model": {"backbone": "vit_digits"},
              "tokenizer": {"kind": "dalle", "path": str(tmp_path / "dalle_encoder.pt"), "patch": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    m = stage.main(tmp_path)
    tok = load_tokenizer(tmp_path / "data" / "tokenizer" / "tokenizer.pt")
    assert m["kind"] == "dalle" and tok.kind == "dalle" and tok.vocab_size == 512 and tok.channels == 1
    ids = tok.encode(torch.randn(2, 1, 8, 8))  # 4 x 4 patches of 2 px: a 32 px DALL-E input
    assert ids.shape == (2, 16) and int(ids.max()) < 512
    assert json.loads((tmp_path / "metrics" / "tokenizer.json").read_text())["vocab"] == 512


# ----------------------------------------------------------------- BEiT
def test_beit_needs_a_vit_a_matching_tokeniser_and_an_upstream(digits, tok_file, tmp_path):
    with pytest.raises(ConfigError, match="beit.backbone"):
        build_method(make_cfg(methods={"beit": str(tok_file)}, beit={**BEIT, "backbone": "smallcnn"}), "beit", digits)
    with pytest.raises(ConfigError, match="beit.backbone"):  # model.backbone, a conv net, when beit names none
        build_method(make_cfg(methods={"beit": str(tok_file)}, beit={**BEIT, "backbone": ""}), "beit", digits)
    with pytest.raises(ConfigError, match="beit.vocab"):
        beit(digits, tok_file, vocab=128)
    save_tokenizer(tmp_path / "p4.pt", random_vq(digits.meta, patch=4))
    with pytest.raises(ConfigError, match="tokenizer.patch"):
        beit(digits, tmp_path / "p4.pt")
    with pytest.raises(ConfigError, match="methods.beit"):
        pretrain(make_cfg(methods={"beit": "data/dataset"}, beit=BEIT), "beit", small(digits, 64), tmp_path / "ck.pt")


def slow_rel_bias(table, g, i, j, head):
    """The official relative position bias of query token i and key token j (0 the CLS token, then the
    g x g patches row-major), written from unilm's RelativePositionBias: the offset (dr, dc) of the two
    patches indexes row (dr + g - 1)(2 g - 1) + dc + g - 1; CLS -> patch, patch -> CLS and CLS -> CLS
    are the last three rows."""
    n = (2 * g - 1) ** 2
    if i == 0 and j == 0:
        return table[n + 2, head]
    if i == 0:
        return table[n, head]
    if j == 0:
        return table[n + 1, head]
    (r1, c1), (r2, c2) = divmod(i - 1, g), divmod(j - 1, g)
    return table[(r1 - r2 + g - 1) * (2 * g - 1) + (c1 - c2 + g - 1), head]


def slow_beit_block(blk, seq, table, g):
    """One BEiT block (unilm modeling_finetune.py Block / Attention, eval mode) on seq (N, D), per head and
    per token pair: q = W_q x + q_bias, k = W_k x (no bias), v = W_v x + v_bias, softmax over keys of
    q.k / sqrt(d) + the relative bias, the output projection, layer scale gamma_1; then the GELU MLP
    scaled by gamma_2."""
    import torch.nn.functional as F

    n, d = seq.shape
    hd = blk.heads
    dh = d // hd
    h1 = F.layer_norm(seq, (d,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    w = blk.qkv.weight  # (3 D, D)
    q = h1 @ w[:d].t() + blk.q_bias
    k = h1 @ w[d:2 * d].t()
    v = h1 @ w[2 * d:].t() + blk.v_bias
    heads = []
    for a in range(hd):
        qa, ka, va = (t[:, a * dh:(a + 1) * dh] for t in (q, k, v))
        logits = torch.stack([torch.stack([qa[i] @ ka[j] / dh ** 0.5 + slow_rel_bias(table, g, i, j, a)
                                           for j in range(n)]) for i in range(n)])
        heads.append(torch.softmax(logits, 1) @ va)
    x = seq + blk.gamma_1 * (torch.cat(heads, 1) @ blk.proj.weight.t() + blk.proj.bias)
    h2 = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    mlp = F.gelu(h2 @ blk.fc1.weight.t() + blk.fc1.bias) @ blk.fc2.weight.t() + blk.fc2.bias
    return x + blk.gamma_2 * mlp


def slow_reference_loss(m, x, mask, ids):
    """Per masked position, written plainly: patch embeddings as a matrix product of the flattened patches,
    the masked ones replaced by the mask token, CLS first, no absolute position embedding, BEiT's blocks
    with the one shared relative position bias (slow_beit_block), the final norm, the lm_head as W h + b,
    -log softmax at the tokeniser's id; the mean over every masked position."""
    trunk = m.backbone.trunk
    v, p, g = trunk.vit, trunk.patch, trunk.grid
    assert v.encoder.pos_embedding is None  # official: use_abs_pos_emb False
    table = trunk.rel_pos_bias.relative_position_bias_table
    wc, bc = v.conv_proj.weight, v.conv_proj.bias  # (D, C, p, p), (D,)
    b_, _, hh, ww = x.shape
    losses = []
    for b in range(b_):
        toks = []
        for i in range(hh // p):
            for j in range(ww // p):
                n = i * (ww // p) + j
                patch = x[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                e = m.mask_token[0, 0] if mask[b, n] else (wc * patch[None]).flatten(1).sum(1) + bc
                toks.append(e)
        seq = torch.stack([v.class_token[0, 0], *toks])
        for layer in v.encoder.layers:
            seq = slow_beit_block(layer, seq, table, g)
        hid = v.encoder.ln(seq[None])[0, 1:]
        for n in range(len(toks)):
            if mask[b, n]:
                logits = m.lm_head.weight @ hid[n] + m.lm_head.bias
                losses.append(-torch.log_softmax(logits, 0)[ids[b, n]])
    return torch.stack(losses).mean()


def test_beit_loss_equals_a_slow_reference(digits, tok_file):
    """The whole pre-training forward (BEiT blocks, shared relative position bias, layer scale, mask token)
    against a per-token, per-head reference written from the official modules."""
    m = beit(digits, tok_file).eval()  # eval: no drop path
    with torch.no_grad():  # a non-zero shared bias table (zero at init) and layer scales, so both count
        m.backbone.trunk.rel_pos_bias.relative_position_bias_table.normal_(0, 1.0)
        for blk in m.backbone.trunk.vit.encoder.layers:
            blk.gamma_1.uniform_(0.5, 1.5)
            blk.gamma_2.uniform_(0.5, 1.5)
    x = torch.randn(4, 1, 8, 8)
    batch = Batch([x], torch.zeros(4, dtype=torch.long), torch.arange(4))
    torch.manual_seed(3)
    loss = m(batch).loss.detach()
    torch.manual_seed(3)  # the same global-RNG state draws the same masks
    mask = m.masks(4, 4, 4, CPU)
    assert mask.shape == (4, 16) and (mask.sum(1) >= 4).all()  # round(0.4 x 16) = 6 at most per image
    with torch.no_grad():
        ref = slow_reference_loss(m, x, mask, m.tokenizer.encode(x))
    assert abs(float(loss) - float(ref)) < 1e-5, (float(loss), float(ref))


def test_the_loss_ignores_unmasked_positions(digits, tok_file):
    m = beit(digits, tok_file).eval()
    x = torch.randn(6, 1, 8, 8)
    batch = Batch([x], torch.zeros(6, dtype=torch.long), torch.arange(6))
    torch.manual_seed(5)
    mask = m.masks(6, 4, 4, CPU)
    ids = torch.randint(0, 64, (6, 16))

    def loss_with(targets):
        m.tokenizer.encode = lambda _x: targets  # the tokeniser's answer, fixed
        torch.manual_seed(5)
        return float(m(batch).loss.detach())

    base = loss_with(ids)
    other = ids.clone()
    other[~mask] = (other[~mask] + 7) % 64  # every unmasked target changed
    assert loss_with(other) == base
    changed = ids.clone()
    changed[mask] = (changed[mask] + 7) % 64
    assert loss_with(changed) != base


def test_the_tokeniser_gets_no_gradient_and_is_not_part_of_the_state(digits, tok_file):
    m = beit(digits, tok_file)
    m.train()
    tok = m.tokenizer
    assert not tok.training  # not a submodule: the loop's method.train() leaves it in eval mode
    torch.manual_seed(0)
    out = m(Batch([torch.randn(8, 1, 8, 8)], torch.zeros(8, dtype=torch.long), torch.arange(8)))
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in tok.parameters())
    assert not any(k.startswith("tokenizer") for k in m.state_dict())
    ids = {id(p) for g in m.param_groups() for p in g["params"]}
    assert not ids & {id(p) for p in tok.parameters()}
    assert {id(p) for p in m.parameters() if p.requires_grad} == ids  # everything else is optimised
    for p in [m.mask_token, m.lm_head.weight, m.backbone.trunk.vit.conv_proj.weight,
              m.backbone.trunk.vit.encoder.layers[0].qkv.weight,
              m.backbone.trunk.rel_pos_bias.relative_position_bias_table]:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_beit_resume_is_exact(digits, tok_file, tmp_path):
    cfg = make_cfg(methods={"beit": str(tok_file)}, beit={**BEIT, "epochs": 2}, log_every=1, checkpoint_minutes=0.0)
    assert_resume_is_exact(cfg, "beit", small(digits, 192), tmp_path, kill_after=1, kill_at_batch=1)


def _train_two_ranks(folder, tok_file, tmp):
    from pathlib import Path

    from selfsup.core import dist
    from selfsup.data.prepared import load_prepared

    data = small(load_prepared(folder), 160)
    cfg = make_cfg(methods={"beit": tok_file}, beit={**BEIT, "epochs": 1, "batch_size": 16}, log_every=1)
    m, hist = pretrain(cfg, "beit", data, Path(tmp) / f"r{dist.rank()}" / "ck.pt")
    return {k: float(v.double().sum()) for k, v in m.state_dict().items()}, [h["loss"] for h in hist]


def test_beit_keeps_two_ranks_in_step(digits_folder, tok_file, tmp_path):
    """DDP (gloo): the tokeniser is no module of the method, so DDP neither syncs nor waits for it."""
    from distributed import run_ranks

    (s0, l0), (s1, l1) = run_ranks(_train_two_ranks, 2, (str(digits_folder), str(tok_file), str(tmp_path)))
    assert s0 == s1 and l0 == l1 and np.isfinite(l0).all()


def test_beit_on_digits_lowers_its_loss(digits, tmp_path):
    tok, _ = train_tokenizer(digits, tokenizer_cfg(TOK), CPU)
    save_tokenizer(tmp_path / "tok.pt", tok)
    cfg = make_cfg(methods={"beit": str(tmp_path / "tok.pt")}, beit={**BEIT, "epochs": 3, "warmup_epochs": 1})
    _, hist = pretrain(cfg, "beit", small(digits, 960), tmp_path / "beit" / "ck.pt")
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.2, [h["loss"] for h in hist]
    assert hist[-1]["mlm_acc"] > hist[0]["mlm_acc"] and hist[-1]["mlm_acc"] > 1.5 / 64
    assert all(abs(h["masked_frac"] - 6 / 16) < 0.01 for h in hist)  # official fill: rarely short of 6
