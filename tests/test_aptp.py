"""APTP: a prompt router picks one of K architecture codes per row; each code is a really smaller
copy of the U-Net's transformer-block parts, and a batch is served by grouping its rows by code.

Tiny random U-Nets from config dicts (tests/test_unet.py) with a router built here, the shipped
tiny-t2i router by name, and a smoke run of the training script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenprune as tp

from .test_unet import hook_count, inputs, params_of, run, tiny_sd_pipeline, tiny_unet

diffusers = pytest.importorskip("diffusers")

from tokenprune.adapters.unet import slice_unet, transformer_blocks, width_units  # noqa: E402
from tokenprune.methods.aptp import layout_of, load_router  # noqa: E402
from tokenprune.methods.aptp_router import APTPRouter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tokenprune" / "zoo" / "weights" / "tiny-t2i" / "aptp" / "aptp.safetensors"


def make_router(unet, seed=0):
    """Three codes: the gates the hypernetwork (scaled up, so its gates are clear-cut) gives the
    first three rows of ``inputs(6, seed=3)``, so those rows go to codes 0, 1, 2."""
    torch.manual_seed(seed)
    r = APTPRouter(layout_of(width_units(transformer_blocks(unet))), num_codes=3, text_dim=32, hidden=8,
                   channel_group=8, tokens=[256, 64, 256, 256], context=7)
    with torch.no_grad():
        for head in r.heads:
            head.weight.mul_(40)
        anchors = r(inputs(6, seed=3)[2][:3])
        r.codes.copy_(torch.where(anchors + r.config["offset"] > 0, 3.0, -5.0))
        r.codes[:, depth_gates(r)] = 3.0  # every block kept (tests below drop blocks on purpose)
    return r


def depth_gates(router):
    """Indices of the depth gates in an architecture vector (the last gate of each block's group)."""
    ends = torch.tensor(router.sizes).cumsum(0)
    return (ends[2::3] - 1).tolist()


@pytest.fixture
def unet():
    return tiny_unet()


@pytest.fixture
def folder(unet, tmp_path):
    r = make_router(unet)
    uncond = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(9))
    r.null.copy_(r.pooled(uncond, None)[0])
    r.save(str(tmp_path / "router"), trained_for="test")
    load_router.cache_clear()
    return str(tmp_path / "router"), uncond


def mixed_inputs(aptp, batch=6):
    """Inputs whose rows the router spreads over the codes (the first three: codes 0, 1, 2)."""
    x, t, ctx = inputs(6, seed=3)
    codes = aptp.route(ctx)
    assert codes[:3].tolist() == [0, 1, 2], f"the test router's anchors went to {codes.tolist()}"
    return x[:batch], t, ctx[:batch], codes[:batch]


def test_routing_groups_rows_by_code_and_reassembles_in_order(unet, folder):
    aptp = tp.build_pruner("aptp", checkpoint=folder[0])
    x, t, ctx, codes = mixed_inputs(aptp)
    experts = [slice_unet(unet, e["heads"], e["channels"]) for e in aptp.experts(width_units(transformer_blocks(unet)))]
    dense = run(unet, x, t, ctx)
    with tp.pruning(unet, aptp) as h:
        out = run(unet, x, t, ctx)
        stats = h.stats
        alone = torch.cat([run(unet, x[i: i + 1], t, ctx[i: i + 1]) for i in range(len(x))])
    by_expert = torch.cat([run(experts[int(k)], x[i: i + 1], t, ctx[i: i + 1]) for i, k in enumerate(codes)])
    assert stats.codes == codes.tolist()
    assert out.shape == dense.shape and not torch.allclose(out, dense, atol=1e-4)
    assert torch.allclose(out, by_expert, atol=1e-5), "each row must be its code's expert's output"
    assert torch.allclose(out, alone, atol=1e-5), "a batch must equal each row alone"
    per_row = [aptp.code_shares()[k] for k in codes.tolist()]
    assert stats.flops_ratio == pytest.approx(sum(per_row) / len(per_row), rel=1e-3)


def test_experts_are_really_smaller(unet, folder):
    from tokenprune.evals.metrics import flop_counter

    aptp = tp.build_pruner("aptp", checkpoint=folder[0])
    x, t, ctx = inputs(2)
    assert all(0.1 < share < 0.9 for share in aptp.code_shares())
    dense_params = sum(p.numel() for p in unet.parameters())

    def flops(model):
        with flop_counter() as fc:
            run(model, x, t, ctx)
        return fc.get_total_flops()

    for k, e in enumerate(aptp.experts(width_units(transformer_blocks(unet)))):
        expert = slice_unet(unet, e["heads"], e["channels"])
        params = sum(p.numel() for p in expert.parameters())
        assert params < dense_params and flops(expert) < flops(unet)
    with tp.pruning(unet, tp.build_pruner("aptp", checkpoint=folder[0], code=2)) as h:
        routed = flops(unet)  # the sliced parts really run: fewer FLOPs, not zero gates
    assert routed < flops(unet) and h.stats.codes == [2, 2]


def test_guidance_rows_follow_their_prompt(unet, folder):
    path, uncond = folder
    aptp = tp.build_pruner("aptp", checkpoint=path)
    x, t, ctx, codes = mixed_inputs(aptp, batch=4)
    own = aptp.route(uncond)[0]  # the unconditional prompt alone: its own nearest code
    B = len(x)
    with tp.pruning(unet, aptp) as h:
        run(unet, torch.cat([x, x]), t, torch.cat([ctx, uncond.expand(B, -1, -1)]))  # [cond; uncond], same noise
        paired = h.stats.codes
        run(unet, x[:1], t, uncond)
        single = h.stats.codes
    assert paired == codes.tolist() * 2 and single == [int(own)]


def test_remove_restores_the_model_exactly(unet, folder):
    x, t, ctx = inputs(3)
    before, hooks, modules = params_of(unet), hook_count(unet), [id(m) for m in unet.modules()]
    dense = run(unet, x, t, ctx)
    handle = tp.prune(unet, tp.build_pruner("aptp", checkpoint=folder[0]))
    assert [id(m) for m in unet.modules()] != modules  # the sliced parts are in while attached
    handle.remove()
    assert torch.equal(run(unet, x, t, ctx), dense) and hook_count(unet) == hooks
    assert [id(m) for m in unet.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_bad_checkpoints_raise_before_the_model_is_touched(unet, folder, tmp_path):
    for bad in (dict(checkpoint=None), dict(checkpoint=str(tmp_path / "nothing")), dict(checkpoint=folder[0], code=3),
                dict(checkpoint=folder[0], code=True)):
        with pytest.raises(tp.TokenPruneError):
            tp.build_pruner("aptp", **bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "aptp.safetensors").write_bytes(b"not a safetensors file")
    (broken / "config.json").write_text("{}")
    with pytest.raises(tp.TokenPruneError, match="cannot read|not an APTP router"):
        tp.build_pruner("aptp", checkpoint=str(broken))
    other = tiny_unet(attention_head_dim=4)  # 4 heads per block instead of 8: the router does not fit
    x, t, ctx = inputs(2)
    before, hooks, dense = params_of(other), hook_count(other), run(other, x, t, ctx)
    with pytest.raises(tp.TokenPruneError, match="trained for a U-Net"):
        tp.prune(other, tp.build_pruner("aptp", checkpoint=folder[0]))
    assert hook_count(other) == hooks and torch.equal(run(other, x, t, ctx), dense)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    aptp = tp.build_pruner("aptp", checkpoint=folder[0])
    with tp.pruning(unet, aptp):
        with pytest.raises(tp.TokenPruneError, match="text states of width 32"):
            run(unet, x, t, torch.randn(2, 7, 16))


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the tiny-t2i APTP router is not trained yet")
def test_shipped_router_on_tiny_t2i():
    from tokenprune.zoo import t2i

    pipe, _ = tp.zoo.load("tiny-t2i")
    aptp = tp.build_pruner("aptp")  # checkpoint="tiny-t2i"
    assert aptp.to_dict() == tp.build_pruner(**aptp.to_dict()).to_dict()
    prompts = t2i.all_prompts()[:: 5]
    ctx, mask = t2i.encode_text(pipe.text_encoder, pipe.tokenizer, prompts)
    want = aptp.route(ctx, mask).tolist()

    def sample():
        return pipe(prompts, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images

    dense = sample()
    with tp.pruning(pipe, aptp) as h:
        images = sample()
    assert images.shape == dense.shape and torch.isfinite(images).all()
    assert h.stats.codes == want * 2  # [prompts; unconditional rows], each pair on its prompt's code
    assert torch.equal(sample(), dense)


def test_training_script_smoke(tmp_path):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "aptp"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(REPO / "evals" / "train" / "train_aptp.py"), "--steps", "2", "--batch", "4",
           "--limit-images", "64", "--eval-n", "3", "--eval-steps", "1", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert (out / "README.md").is_file() and (out / "metrics.json").is_file()
    aptp = tp.build_pruner("aptp", checkpoint=str(out))
    assert aptp.router.num_codes == 4 and len(aptp.code_shares()) == 4


def test_training_gates_compute_what_the_experts_compute(unet, tmp_path):
    """train_aptp.py's 0 / 1 gates on a full U-Net equal each code's expert as the adapter builds
    it (train = inference), with a width group that loses every gate (its strongest unit stays)
    and a depth gate that drops a whole block (its attn1 / attn2 / ff removed, costing nothing)."""
    import copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_aptp", REPO / "evals" / "train" / "train_aptp.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    router = make_router(unet)
    with torch.no_grad():
        router.codes[1, : router.sizes[0]] = -9.0  # block 0 loses every head: the strongest one stays
        router.codes[2, depth_gates(router)[1]] = -9.0  # code 2 drops block 1 whole
    gated = copy.deepcopy(unet)
    gates = train.Gates(gated, router)
    x, t, ctx = inputs(3)
    gates.value = router.gates(router.codes, noise=False)  # row k on code k
    out = run(gated, x, t, ctx)
    gates.remove()
    heads = [router.code_masks(k)[0] for k in range(3)]
    assert int(heads[1][0].sum()) == 1 and router.dropped_blocks(2) == [1] and not bool(heads[2][1].any())
    router.save(str(tmp_path / "r"))
    load_router.cache_clear()
    blocks = transformer_blocks(unet)
    for k in range(3):
        with tp.pruning(unet, tp.build_pruner("aptp", checkpoint=str(tmp_path / "r"), code=k)) as h:
            alone = run(unet, x[k: k + 1], t, ctx[k: k + 1])
            removed = [type(b.ff.copies[k] if hasattr(b.ff, "copies") else b.ff).__name__ == "_Removed" for b in blocks]
        assert torch.allclose(out[k: k + 1], alone, atol=1e-5)
        assert h.stats.flops_ratio == pytest.approx(router.kept_share(k), rel=1e-3)
        assert removed == [k == 2 and i == 1 for i in range(len(blocks))]
    assert router.kept_share(2) < router.kept_share(0)


def test_negative_prompt_pairs_run_on_one_expert(tmp_path):
    """A real StableDiffusionPipeline call with a negative prompt: each image's guidance rows
    (negative prompt, prompt; same noise) run on one expert, the wider of the two rows' codes,
    so the images equal a run with that expert forced; different noise keeps rows apart."""
    from tokenprune.methods.aptp import APTP

    pipe = tiny_sd_pipeline(tmp_path)
    prompt, negative = "a red cat", "blurry"
    ids = pipe.tokenizer([negative, prompt, "two dogs"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = pipe.text_encoder(ids)[0]
    torch.manual_seed(0)
    r = APTPRouter(layout_of(width_units(transformer_blocks(pipe.unet))), num_codes=3, text_dim=32, hidden=8,
                   tokens=[256, 64, 256, 256], context=16)
    with torch.no_grad():  # code k = the (clear-cut) gates of text k: the negative prompt on 0, the prompt on 1
        for head in r.heads:
            head.weight.mul_(40)
        r.codes.copy_(torch.where(r(ctx) + r.config["offset"] > 0, 3.0, -5.0))
        r.codes[:, depth_gates(r)] = 3.0
    r.save(str(tmp_path / "r"))
    load_router.cache_clear()
    aptp = tp.build_pruner("aptp", checkpoint=str(tmp_path / "r"))
    neg, mine = aptp.route(ctx[:2]).tolist()
    assert (neg, mine) == (0, 1), "the test router's anchors"
    shares = aptp.code_shares()
    wider = mine if shares[mine] >= shares[neg] else neg
    assert shares[0] != shares[1]

    def sample(pruner, seed=0):
        calls = []
        with tp.pruning(pipe, pruner) as h:
            hook = pipe.unet.register_forward_hook(lambda *a: calls.append(h.stats.codes))
            images = pipe([prompt], negative_prompt=[negative], guidance_scale=5.0, num_inference_steps=2,
                          height=16, width=16, generator=torch.Generator().manual_seed(seed), output_type="pt").images
            hook.remove()
        return images, calls

    routed, calls = sample(aptp)
    assert calls and all(c == [wider, wider] for c in calls), calls  # [negative row, prompt row] of every step
    forced, _ = sample(APTP(checkpoint=str(tmp_path / "r"), code=wider))
    assert torch.equal(routed, forced)
    x, t, _ = inputs(2)
    ctx = ctx[:2]
    assert aptp.route(ctx, sample=torch.cat([x[:1], x[:1]])).tolist() == [wider, wider]
    assert aptp.route(ctx, sample=x).tolist() == [neg, mine]  # not a guidance pair: each row its own code


def test_from_shares_builds_experts_of_the_given_sizes(unet, tmp_path):
    layout = layout_of(width_units(transformer_blocks(unet)))
    r = APTPRouter.from_shares(layout, [1.0, 0.5, 0.25], text_dim=32, tokens=[256, 64, 256, 256], context=7)
    shares = [r.kept_share(k) for k in range(3)]
    assert shares[0] == pytest.approx(1.0) and 0.4 < shares[1] < 0.6 and 0.15 < shares[2] < 0.35
    r.save(str(tmp_path / "r"))
    load_router.cache_clear()
    x, t, ctx = inputs(2)
    dense = run(unet, x, t, ctx)
    for k in range(3):
        with tp.pruning(unet, tp.build_pruner("aptp", checkpoint=str(tmp_path / "r"), code=k)) as h:
            out = run(unet, x, t, ctx)
        assert h.stats.flops_ratio == pytest.approx(shares[k], rel=1e-3)
        assert torch.equal(out, dense) == (k == 0)
    with pytest.raises(ValueError):
        APTPRouter.from_shares(layout, [0.0], text_dim=32)


def test_an_old_router_version_raises(unet, tmp_path):
    import json

    make_router(unet).save(str(tmp_path / "old"))
    cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps({**cfg, "version": 1}))
    load_router.cache_clear()
    with pytest.raises(tp.TokenPruneError, match="version 2"):
        tp.build_pruner("aptp", checkpoint=str(tmp_path / "old"))
