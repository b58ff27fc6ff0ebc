"""The Gradio app's handlers (demos/app.py) without a browser: results, errors in the page, shared models."""
import importlib.util
import os
import re
import threading
import urllib.request

import pytest

from .app_server import free_port, start_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("tokenprune_app", os.path.join(ROOT, "demos", "app.py"))
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)

PROMPT = app.LLM_PROMPT


def test_llm_tab_shows_answers_stats_plot_and_dropped_tokens():
    status, dense, pruned, stats, plot, tokens = app.run_llm(PROMPT, "fastv", "4", 0.5, 6)
    assert status.startswith("**fastv** keeps"), status
    assert dense and pruned
    assert "| FLOPs (transformer layers) |" in stats and "| KV cache |" in stats
    assert plot is not None and plot.axes[0].get_xlabel() == "layer"
    kept, total = map(int, re.search(r"keeps (\d+) of (\d+)", status).groups())
    dropped = [t for t, label in tokens if label]
    assert len(tokens) == total and len(dropped) == total - kept > 0
    assert {label for _, label in tokens if label} == {"dropped at layer 4"}


@pytest.mark.parametrize("layer, keep, prompt, message", [
    ("4", 1.5, PROMPT, "keep_ratio must be a number in [0, 1], got 1.5"),
    ("4", None, PROMPT, "keep ratio is empty"),
    ("40", 0.5, PROMPT, "layer 40 is beyond the model, which has 30 layers"),
    ("four", 0.5, PROMPT, "layer must be an integer or a list"),
    ("0", 0.5, PROMPT, "layer must be an integer >= 1"),
    ("4", 0.5, "   ", "the prompt is empty"),
])
def test_llm_errors_show_the_library_message(layer, keep, prompt, message):
    status, *rest = app.run_llm(prompt, "fastv", layer, keep, 4)
    assert status.startswith("**Error:**") and message in status
    assert "Traceback" not in status and rest == ["", "", "", None, None]


def test_vit_tab_classifies_and_draws_one_overlay_per_pruning_layer():
    image = app.compare.sample_image("vit", 0)
    status, dense, pruned, sheet = app.run_vit("tiny-vit", image, "", "zero-tprune", "2, 4", 0.5)
    assert "dense says *ankle boot*" in status
    assert max(dense, key=dense.get) == "ankle boot" and len(pruned) == 5
    assert "layer 2: 32 of 64 patches kept; layer 4: 16 of 64 patches kept." in status
    assert sheet.size == (2 * 256 + 8, 256 + 26)  # one overlay per pruning layer, side by side
    status, dense, pruned, sheet = app.run_vit("tiny-clip", image, "ankle boot, bag, dress", "tome", "", 0.5)
    assert set(dense) == {"ankle boot", "bag", "dress"} and sheet.size == (256, 256 + 26)
    status, *_ = app.run_vit("tiny-vit", None, "", "tome", "", 0.5)
    assert status == "**Error:** pick a test image or upload one"


def test_concurrent_sessions_never_see_each_others_pruner():
    """Two sessions on one shared model, different settings, at once: each gets its solo result."""
    image = app.compare.sample_image("vit", 1)
    settings = {"a": ("zero-tprune", "2", 0.25), "b": ("random", "1, 3", 0.75)}
    solo = {k: app.run_vit("tiny-vit", image, "", *s) for k, s in settings.items()}
    llm = {"a": 0.25, "b": 0.75}
    llm_solo = {k: app.run_llm(PROMPT, "fastv", "4", v, 3) for k, v in llm.items()}
    captions = {k: r[0].split("Patches taking part:")[1].split(".")[0] for k, r in solo.items()}
    assert captions["a"] != captions["b"] and llm_solo["a"][5] != llm_solo["b"][5]  # the settings do differ
    results, start = {}, threading.Barrier(4)

    def vit(k):
        start.wait()
        results[("vit", k)] = [app.run_vit("tiny-vit", image, "", *settings[k]) for _ in range(3)]

    def text(k):
        start.wait()
        results[("llm", k)] = app.run_llm(PROMPT, "fastv", "4", llm[k], 3)

    threads = [threading.Thread(target=f, args=(k,)) for f in (vit, text) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for k in settings:
        for status, dense, pruned, overlays in results[("vit", k)]:
            assert status.split("Patches taking part:")[1].split(".")[0] == captions[k]
            assert pruned == pytest.approx(solo[k][2], abs=1e-5)
        got, want = results[("llm", k)], llm_solo[k]
        assert got[2] == want[2] and got[5] == want[5]  # same pruned answer, same dropped tokens
        assert re.search(r"keeps \d+ of \d+", got[0]).group() == re.search(r"keeps \d+ of \d+", want[0]).group()


@pytest.mark.skipif(not app.lvlm_available(), reason="no LVLM adapter in this checkout yet")
def test_lvlm_tab_answers_and_marks_kept_visual_tokens():
    image = app.compare.sample_image("lvlm", 0)
    status, dense, pruned, sheet = app.run_lvlm(image, "what color is the shape?", "fastv", "2", 0.25)
    assert "on the 64 visual tokens" in status, status
    assert dense and pruned
    assert "Visual tokens taking part: layer 2: 16 of 64 patches kept." in status and sheet.size == (256, 282)
    status, *_ = app.run_lvlm(image, "what color is the shape?", "vflowopt", "", 0.25)  # two stages, recycling
    assert "layer 1: 16 of 64 patches kept, 16 took in pruned ones; layer 2: 4 of 64 patches kept" in status


def test_t2i_tab_generates_both_images_and_reads_them():
    status, dense, pruned = app.run_t2i("a red circle", "tome-sd", 0.5, 25, 0)
    assert "the judge reads the dense image as *red circle*" in status, status  # tiny-t2i draws it right
    assert "| FLOPs of one U-Net call (a denoising step) | 0.198 G | 0.154 G | 0.777 |" in status
    assert dense.size == pruned.size == (192, 192) and dense.tobytes() != pruned.tobytes()  # 32 px, shown 6x
    status, *_ = app.run_t2i("a dog", "tome-sd", 0.5, 25, 0)
    assert status.startswith("**Error:** prompt 'a dog' must name exactly one of")


def test_t2i_tab_runs_the_width_methods_with_their_own_budget():
    import tokenprune as tp

    status, dense, pruned = app.run_t2i("a red circle", "unet-static", 0.5, 4, 0)  # its budget field is `keep`
    assert "**unet-static**" in status and dense.size == pruned.size, status
    status, dense, pruned = app.run_t2i("a red circle", "aptp", 0.5, 4, 0)  # no budget: the router decides
    code = tp.build_pruner("aptp").route(*app.get_model("tiny-t2i").model.encode_prompt(["a red circle"], False))
    share = tp.build_pruner("aptp").code_shares()[int(code[0])]
    assert f"The router sent this prompt to code {int(code[0])}, which keeps {share:.2f}" in status, status


def test_app_serves_on_the_port_flag_and_prints_its_url():
    port = free_port()
    # --port wins over the variable
    proc, url = start_app(["--port", str(port)], env={"GRADIO_SERVER_PORT": str(free_port())})
    try:
        assert url == f"http://127.0.0.1:{port}/"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and "tokenprune" in r.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
