"""tokenprune in the browser: dense vs pruned on the bundled offline models, one tab per family.

    python demos/app.py [--port 7860] [--host 127.0.0.1] [--preload]
    make demo

LLM (SmolLM2-135M): prompt -> both answers, tokens kept per layer, prefill time / FLOPs / KV
bytes, the dropped prompt tokens highlighted. ViT (tiny-vit, tiny-clip): image -> top classes,
the kept patches at each pruning layer. LVLM (tiny-llava, when the LVLM adapter is installed):
easy-vqa image + question -> both answers, kept visual tokens on the image. Text to image
(tiny-t2i): prompt -> both images and what a judge reads in them, FLOPs per denoising step.

Each model loads once, on first use, and serves every session. The dense and pruned calls of
one request hold that model's lock (tokenprune.evals.compare.model_lock), so two users with
different settings never see each other's pruner. Bad settings show the library's message.
"""
from __future__ import annotations

import argparse
import itertools
import logging

import gradio as gr
import numpy as np
import torch

import tokenprune as tp
from tokenprune.evals import compare
from tokenprune.evals.runner import BUDGET_FREE, budget_field

log = logging.getLogger("tokenprune.app")
_REQUESTS = itertools.count(1)  # numbers each finished request, so a page can tell a new result from the last


def done(text: str) -> str:
    return f"{text} *(request {next(_REQUESTS)})*"


LLM_PROMPT = (
    "Read the passage and answer the question.\n\n"
    "The Python programming language was created by Guido van Rossum and first released in 1991. It "
    "emphasises code readability with significant indentation. Python is dynamically typed and "
    "garbage-collected, and supports multiple programming paradigms, including structured, "
    "object-oriented and functional programming.\n\nQuestion: Who created Python?"
)
VQA_QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a red shape?",
                 "is there a circle?", "is there not a triangle?"]


def get_model(name: str) -> compare.Loaded:
    """Load a bundled model once (compare.load_model caches it); every session shares it."""
    return compare.load_model(name)


def lvlm_available() -> bool:
    """True once tokenprune has an adapter for the bundled LLaVA (adapters/lvlm.py)."""
    from tokenprune.adapters import ADAPTERS

    return any(a.__module__.endswith(".lvlm") for a in ADAPTERS)


# ---- settings from the page --------------------------------------------------------------
def parse_layer(text) -> int | tuple | None:
    """'' -> method default; '4' -> 4; '2, 4' or '[2,4]' -> (2, 4)."""
    text = str(text if text is not None else "").strip().strip("[]")
    if not text:
        return None
    try:
        layers = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise tp.TokenPruneError(f"layer must be an integer or a list like 2, 4; got {text!r}") from None
    return layers[0] if len(layers) == 1 else tuple(layers)


def build(loaded: compare.Loaded, method: str, layer_text, keep_ratio) -> tp.Pruner:
    if keep_ratio is None or keep_ratio == "":
        raise tp.TokenPruneError("keep ratio is empty: give a number in [0, 1]")
    config = {**compare.method_defaults(loaded, method), "keep_ratio": float(keep_ratio)}
    layer = parse_layer(layer_text)
    if layer is not None:
        config["layer"] = layer
    return tp.build_pruner(method, **config)


def error_text(e: Exception) -> str:
    """What a page shows for a failed request: the library's message, no stack trace."""
    if isinstance(e, tp.TokenPruneError):
        return f"**Error:** {e}"
    log.exception("request failed")
    return f"**Error ({type(e).__name__}):** {e}"


# ---- what the pages show -----------------------------------------------------------------
def _ms(s):
    return f"{s * 1e3:.1f} ms"


def stats_table(r: dict) -> str:
    s, t = r["stats"], r["time"]
    rows = [
        "| | dense | pruned | pruned / dense |",
        "|---|---|---|---|",
        f"| {t['what'].split(',')[0]} time | {_ms(t['dense_s'])} | {_ms(t['pruned_s'])} | "
        f"{t['pruned_s'] / t['dense_s']:.2f} (speed-up {t['speedup']:.2f}x) |",
        f"| FLOPs (transformer layers) | {s['dense_flops'] / 1e9:.3f} G | {s['flops'] / 1e9:.3f} G | "
        f"{s['flops_ratio']:.3f} |",
    ]
    if s.get("dense_kv_bytes"):
        rows.append(f"| KV cache | {s['dense_kv_bytes'] / 2**20:.2f} MiB | {s['kv_bytes'] / 2**20:.2f} MiB | "
                    f"{s['kv_ratio']:.3f} |")
    per_layer = [sum(row) for row in s["tokens_per_layer"]]
    rows.append(f"| tokens entering the last layer | {sum(s['dense_tokens'])} | {per_layer[-1]} | "
                f"{per_layer[-1] / max(sum(s['dense_tokens']), 1):.3f} |")
    text = "\n".join(rows)
    if not s["pruned_anything"]:
        text += "\n\n**" + s["summary"].split("\n", 1)[1] + "**"
    return text + f"\n\nTimes: {t['what']} (one CPU; read them as ratios)."


def tokens_plot(r: dict, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["stats"]
    counts = [sum(row) for row in s["tokens_per_layer"]]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(counts) + 1)  # the count entering layer l spans [l, l + 1)
    ax.step(xs, [sum(s["dense_tokens"])] * (len(counts) + 1), where="post", color="0.5", linestyle="--",
            label="dense")
    ax.step(xs, counts + counts[-1:], where="post", color="tab:blue", label=r["pruner"]["name"])
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens entering the layer")
    ax.set_ylim(0, sum(s["dense_tokens"]) * 1.1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    plt.close(fig)
    return fig


def dropped_at(r: dict, positions) -> dict[int, int]:
    """Original position -> the layer before which it left (positions never dropped are absent)."""
    out, alive = {}, set(positions)
    for layer in sorted(r["kept"]):
        kept = set(r["kept"][layer])
        for p in sorted(alive - kept):
            out[p] = layer
        alive &= kept
    return out


def highlighted_prompt(r: dict) -> list[tuple[str, str | None]]:
    gone = dropped_at(r, range(len(r["tokens"])))
    return [(tok, f"dropped at layer {gone[i]}" if i in gone else None) for i, tok in enumerate(r["tokens"])]


def patch_overlays(image, grid: int, kept_patches: dict[int, list[int]], recycled: dict | None = None,
                   size: int = 256) -> list:
    """The image once per pruning layer: pruned patches shaded, kept ones outlined green,
    kept ones that took in pruned tokens (VFlowOpt's recycling, merges) outlined yellow."""
    from PIL import Image, ImageDraw

    base = image.convert("RGB").resize((size, size), Image.NEAREST)
    dark = float(np.asarray(base.convert("L")).mean()) < 100
    shade = (255, 255, 255, 150) if dark else (0, 0, 0, 150)  # visible on black Fashion-MNIST and pastel easy-vqa
    cell = size / grid
    out = []
    for layer in sorted(kept_patches):
        kept, into = set(kept_patches[layer]), set((recycled or {}).get(layer, ()))
        over = Image.new("RGBA", base.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(over)
        for p in range(grid * grid):
            r_, c = divmod(p, grid)
            box = (c * cell, r_ * cell, (c + 1) * cell - 1, (r_ + 1) * cell - 1)
            if p in into:
                d.rectangle(box, outline=(255, 200, 0, 255), width=3)
            elif p in kept:
                d.rectangle(box, outline=(0, 200, 0, 255), width=1)
            else:
                d.rectangle(box, fill=shade)
        im = Image.alpha_composite(base.convert("RGBA"), over).convert("RGB")
        text = f"layer {layer}: {len(kept)} of {grid * grid} patches kept"
        out.append((im, text + (f", {len(into)} took in pruned ones" if into else "")))
    return out


def side_by_side(overlays: list) -> "Image":
    """One picture of the per-layer overlays, each captioned (a gallery would crop or zoom them)."""
    from PIL import Image, ImageDraw

    if not overlays:
        return None
    w, h = overlays[0][0].size
    pad = 26
    sheet = Image.new("RGB", (len(overlays) * (w + 8) - 8, h + pad), "white")
    d = ImageDraw.Draw(sheet)
    for k, (im, caption) in enumerate(overlays):
        sheet.paste(im, (k * (w + 8), pad))
        d.text((k * (w + 8) + 2, 6), caption.split(",")[0], fill=(0, 0, 0))
    return sheet


# ---- LLM tab -----------------------------------------------------------------------------
def run_llm(prompt, method, layer_text, keep_ratio, max_new_tokens):
    empty = ("", "", "", None, None)
    try:
        loaded = get_model("smollm2-135m")
        pruner = build(loaded, method, layer_text, keep_ratio)
        r = compare.compare_llm(loaded.model, loaded.processor, pruner, prompt, int(max_new_tokens or 32))
    except Exception as e:  # noqa: BLE001 - every failure is shown in the page
        return (error_text(e), *empty)
    s = r["stats"]
    status = done(f"**{r['pruner']['name']}** keeps {s['tokens_per_layer'][-1][0]} of {r['prompt_tokens']} prompt "
                  f"tokens after layer {min(r['kept'] or [0])}: FLOPs {s['flops_ratio']:.1%} of dense, "
                  f"prefill speed-up {r['time']['speedup']:.2f}x.")
    return (status, r["dense_answer"], r["pruned_answer"], stats_table(r),
            tokens_plot(r, f"SmolLM2-135M, {r['prompt_tokens']}-token prompt"), highlighted_prompt(r))


def llm_tab(methods):
    gr.Markdown("SmolLM2-135M-Instruct (real weights, offline). The prompt is wrapped in the chat "
                "template; the pruner drops prompt tokens before `layer` (and every listed layer).")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(LLM_PROMPT, lines=7, label="Prompt", elem_id="llm-prompt")
        with gr.Column(scale=2):
            method = gr.Dropdown(methods, value="fastv", label="Method", elem_id="llm-method")
            layer = gr.Textbox("4", label="Layer(s): first layer on the reduced set, or a list like 4, 12",
                               elem_id="llm-layer")
            keep = gr.Number(0.5, label="Keep ratio (share of prompt tokens kept)", elem_id="llm-keep")
            max_new = gr.Number(24, label="Max new tokens", precision=0, elem_id="llm-max-new")
            go = gr.Button("Run dense and pruned", variant="primary", elem_id="llm-run")
    status = gr.Markdown(elem_id="llm-status")
    with gr.Row():
        dense = gr.Textbox(label="Dense answer", lines=4, elem_id="llm-dense")
        pruned = gr.Textbox(label="Pruned answer", lines=4, elem_id="llm-pruned")
    with gr.Row():
        stats = gr.Markdown(elem_id="llm-stats")
        plot = gr.Plot(label="Tokens per layer", elem_id="llm-plot")
    tokens = gr.HighlightedText(label="Prompt tokens (highlighted: dropped)", show_legend=True,
                                combine_adjacent=False, elem_id="llm-tokens")
    go.click(run_llm, [prompt, method, layer, keep, max_new], [status, dense, pruned, stats, plot, tokens],
             concurrency_limit=4)


# ---- ViT tab -----------------------------------------------------------------------------
def vit_choices():
    from tokenprune.zoo.data import FASHION_MNIST_CLASSES, fashion_mnist

    labels = fashion_mnist("test")[1]
    return [f"{i}: {FASHION_MNIST_CLASSES[int(labels[i])]}" for i in range(24)]


def pick_vit_image(choice):
    try:
        return compare.sample_image("vit", int(str(choice).split(":")[0]))
    except Exception as e:  # noqa: BLE001
        raise gr.Error(str(e)) from None


def run_vit(model_name, image, labels_text, method, layer_text, keep_ratio):
    empty = ("", None, None, None)
    try:
        if image is None:
            raise tp.TokenPruneError("pick a test image or upload one")
        loaded = get_model(model_name)
        pruner = build(loaded, method, layer_text, keep_ratio)
        labels = labels_text.split(",") if model_name == "tiny-clip" else None
        pixels, forward, labels = compare.classifier_inputs(loaded, image, labels)
        r = compare.compare_classifier(loaded.model, forward, pixels, labels, pruner)
    except Exception as e:  # noqa: BLE001
        return (error_text(e), *empty)
    grid = int(round((r["stats"]["dense_tokens"][0] - 1) ** 0.5))  # one CLS token before the patches
    kept = {layer: [i - 1 for i in idx if i >= 1] for layer, idx in r["kept"].items()}
    overlays = patch_overlays(image, grid, kept)
    status = done(f"**{r['pruner']['name']}**: dense says *{r['dense_top'][0][0]}*, pruned says "
                  f"*{r['pruned_top'][0][0]}*; FLOPs {r['stats']['flops_ratio']:.1%} of dense.")
    status += "\n\nPatches taking part: " + "; ".join(c for _, c in overlays) + "."
    return (status + "\n\n" + stats_table(r), dict(r["dense_top"]), dict(r["pruned_top"]), side_by_side(overlays))


def vit_tab(methods):
    from tokenprune.zoo.data import FASHION_MNIST_CLASSES

    gr.Markdown("tiny-vit (a ViT classifier) and tiny-clip (an open_clip model, zero-shot), both trained here on "
                "Fashion-MNIST. The pruner works on the 64 image patches; the CLS token is never pruned.")
    with gr.Row():
        with gr.Column(scale=2):
            model = gr.Radio(["tiny-vit", "tiny-clip"], value="tiny-vit", label="Model", elem_id="vit-model")
            choice = gr.Dropdown(vit_choices(), value="0: ankle boot", label="Fashion-MNIST test image",
                                 elem_id="vit-pick")
            image = gr.Image(value=compare.sample_image("vit", 0), type="pil", label="Image (or upload one)",
                             height=180, elem_id="vit-image")
            labels = gr.Textbox(", ".join(FASHION_MNIST_CLASSES), label="tiny-clip: class names (comma-separated)",
                                elem_id="vit-labels")
        with gr.Column(scale=2):
            method = gr.Dropdown(methods, value="zero-tprune", label="Method", elem_id="vit-method")
            layer = gr.Textbox("2, 4", label="Layer(s) of 6 (empty: the method's default)", elem_id="vit-layer")
            keep = gr.Number(0.5, label="Keep ratio (share of patches kept at each layer)", elem_id="vit-keep")
            go = gr.Button("Classify dense and pruned", variant="primary", elem_id="vit-run")
    status = gr.Markdown(elem_id="vit-status")
    with gr.Row():
        dense = gr.Label(num_top_classes=5, label="Dense", elem_id="vit-dense")
        pruned = gr.Label(num_top_classes=5, label="Pruned", elem_id="vit-pruned")
    gallery = gr.Image(label="Patches that take part after each pruning layer (shaded: pruned or merged away)",
                       type="pil", interactive=False, elem_id="vit-overlays")
    choice.change(pick_vit_image, choice, image)
    go.click(run_vit, [model, image, labels, method, layer, keep], [status, dense, pruned, gallery],
             concurrency_limit=4)


# ---- LVLM tab ----------------------------------------------------------------------------
def lvlm_choices():
    return [f"easy-vqa test image {i}" for i in range(24)]


def pick_lvlm_image(choice):
    try:
        return compare.sample_image("lvlm", int(str(choice).split()[-1]))
    except Exception as e:  # noqa: BLE001
        raise gr.Error(str(e)) from None


def run_lvlm(image, question, method, layer_text, keep_ratio):
    empty = ("", "", None)
    try:
        if image is None:
            raise tp.TokenPruneError("pick a test image")
        loaded = get_model("tiny-llava")
        pruner = build(loaded, method, layer_text, keep_ratio)
        r = compare.compare_lvlm(loaded.model, loaded.processor, pruner, image, question)
    except Exception as e:  # noqa: BLE001
        return (error_text(e), *empty)
    visual = r["visual_positions"]
    grid = int(round(len(visual) ** 0.5))
    if r["kept_space"] == "vision":  # tower positions: CLS, then the patches
        where = {k + 1: k for k in range(len(visual))}
    else:
        where = {pos: k for k, pos in enumerate(visual)}
    kept = {layer: [where[i] for i in idx if i in where] for layer, idx in r["kept"].items()}
    recycled = {layer: [where[d] for _, d in pairs if d in where] for layer, pairs in r["merged"].items()}
    where_text = "vision tower" if r["kept_space"] == "vision" else "language model"
    status = done(f"**{r['pruner']['name']}** on the {len(visual)} visual tokens ({where_text}): dense answers "
                  f"*{r['dense_answer']}*, pruned *{r['pruned_answer']}*.") + "\n\n" + stats_table(r)
    overlays = patch_overlays(image, grid, kept, recycled)
    status += "\n\nVisual tokens taking part: " + "; ".join(c for _, c in overlays) + "."
    return (status, r["dense_answer"], r["pruned_answer"], side_by_side(overlays))


def lvlm_tab(methods):
    gr.Markdown("tiny-llava: a LLaVA (CLIP vision tower, projector, Llama decoder) trained here on easy-vqa. "
                "The pruner drops visual tokens inside the decoder; the answer ends with its last word.")
    with gr.Row():
        with gr.Column(scale=2):
            choice = gr.Dropdown(lvlm_choices(), value=lvlm_choices()[0], label="easy-vqa test image",
                                 elem_id="lvlm-pick")
            image = gr.Image(value=compare.sample_image("lvlm", 0), type="pil", label="Image", height=180,
                             elem_id="lvlm-image")
            question = gr.Dropdown(VQA_QUESTIONS, value=VQA_QUESTIONS[0], allow_custom_value=True,
                                   label="Question", elem_id="lvlm-question")
        with gr.Column(scale=2):
            method = gr.Dropdown(methods, value="fastv", label="Method", elem_id="lvlm-method")
            layer = gr.Textbox("", label="Layer(s) (empty: the method's default)", elem_id="lvlm-layer")
            keep = gr.Number(0.25, label="Keep ratio (share of visual tokens kept)", elem_id="lvlm-keep")
            go = gr.Button("Answer dense and pruned", variant="primary", elem_id="lvlm-run")
    status = gr.Markdown(elem_id="lvlm-status")
    with gr.Row():
        dense = gr.Textbox(label="Dense answer", elem_id="lvlm-dense")
        pruned = gr.Textbox(label="Pruned answer", elem_id="lvlm-pruned")
    gallery = gr.Image(label="Visual tokens taking part after each pruning layer (shaded: pruned; yellow: kept "
                       "tokens that took in pruned ones)", type="pil", interactive=False, elem_id="lvlm-overlays")
    choice.change(pick_lvlm_image, choice, image)
    go.click(run_lvlm, [image, question, method, layer, keep], [status, dense, pruned, gallery],
             concurrency_limit=4)


# ---- text-to-image tab ------------------------------------------------------------------
def run_t2i(prompt, method, budget, steps, seed):
    empty = ("", None, None)
    try:
        loaded = get_model("tiny-t2i")
        if budget is None or budget == "":
            raise tp.TokenPruneError("the budget is empty: give a number in [0, 1]")
        config = compare.method_defaults(loaded, method)
        if method not in BUDGET_FREE:  # APTP's router picks the size per prompt: no budget to set
            config[budget_field(method)] = float(budget)
        pruner = tp.build_pruner(method, **config)
        r = compare.compare_t2i(loaded.model, loaded.processor, pruner, prompt, int(steps or 25), int(seed or 0))
    except Exception as e:  # noqa: BLE001
        return (error_text(e), *empty)
    codes, shares = r["stats"].get("codes"), getattr(pruner, "code_shares", None)
    routed = (f" The router sent this prompt to code {codes[-1]}, which keeps {shares()[codes[-1]]:.2f} of the "
              f"transformer blocks' MACs." if codes and shares else "")
    status = done(f"**{r['pruner']['name']}**: the judge reads the dense image as *{r['dense_reads']}* and the "
                  f"pruned one as *{r['pruned_reads']}*.{routed}") + "\n\n" + stats_table(r).replace(
        "FLOPs (transformer layers)", "FLOPs of one U-Net call (a denoising step)").replace(
        "tokens entering the last layer", "tokens entering the last attention block")
    big = lambda im: im.resize((im.width * 6, im.height * 6), 0)  # noqa: E731  (0: nearest; 32 px is tiny)
    return status, big(r["dense_image"]), big(r["pruned_image"])


def t2i_tab(methods):
    from tokenprune.zoo.t2i import all_prompts

    gr.Markdown("tiny-t2i: a small diffusers pipeline (U-Net + MiniLM text encoder) trained here on easy-vqa "
                "shapes, 32x32 images; a small CNN judge reads each image's color and shape. ToMe-SD merges "
                "tokens inside the U-Net's attention blocks and unmerges them after; unet-static keeps the same "
                "heads and channels for every prompt; APTP's router picks one of its pruned U-Nets per prompt.")
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Dropdown(all_prompts(), value="a red circle", allow_custom_value=True, label="Prompt",
                                 elem_id="t2i-prompt")
            steps = gr.Number(25, label="Denoising steps", precision=0, elem_id="t2i-steps")
            seed = gr.Number(0, label="Seed", precision=0, elem_id="t2i-seed")
        with gr.Column(scale=2):
            method = gr.Dropdown(methods, value="tome-sd", label="Method", elem_id="t2i-method")
            budget = gr.Number(0.5, label="Budget: tome-sd's ratio (share of tokens merged); unet-static's keep; others: keep ratio; "
                               "APTP: none (its router decides)",
                               elem_id="t2i-budget")
            go = gr.Button("Generate dense and pruned", variant="primary", elem_id="t2i-run")
    status = gr.Markdown(elem_id="t2i-status")
    with gr.Row():
        dense = gr.Image(label="Dense", type="pil", interactive=False, elem_id="t2i-dense")
        pruned = gr.Image(label="Pruned", type="pil", interactive=False, elem_id="t2i-pruned")
    go.click(run_t2i, [prompt, method, budget, steps, seed], [status, dense, pruned], concurrency_limit=4)


# ---- the app -----------------------------------------------------------------------------
def make_app() -> gr.Blocks:
    # token methods (those with a keep_ratio) for the transformer tabs; every method for the U-Net
    methods = [m for m in tp.list_pruners() if "keep_ratio" in compare.config_fields(m)]
    with gr.Blocks(title="tokenprune", analytics_enabled=False) as app:
        gr.Markdown("# tokenprune: dense vs pruned\nEvery run calls the model twice on the same input, once as "
                    "is and once with the pruner attached, on bundled offline models.")
        with gr.Tab("LLM", id="llm"):
            llm_tab(methods)
        with gr.Tab("ViT", id="vit"):
            vit_tab(methods)
        if lvlm_available():
            with gr.Tab("LVLM", id="lvlm"):
                lvlm_tab(methods)
        with gr.Tab("Text to image", id="t2i"):
            t2i_tab(tp.list_pruners())
    return app


THEME_FONTS = dict(font=["system-ui", "sans-serif"], font_mono=["monospace"])  # no web fonts: offline
# the bundled images are 28 to 64 pixels: show them large, pixels sharp
CSS = ("#vit-image img, #lvlm-image img, #t2i-dense img, #t2i-pruned img "
       "{width: 168px !important; height: 168px !important; image-rendering: pixelated;}")


def launch(app: gr.Blocks, host: str, port: int | None, **kwargs):
    """Start serving; returns the local URL (port None: Gradio's own choice, GRADIO_SERVER_PORT or 7860)."""
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(server_name=host, server_port=port, theme=gr.themes.Default(**THEME_FONTS),
                           css=CSS, ssr_mode=False, footer_links=[], **kwargs)
    return url


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to serve on (default 127.0.0.1)")
    ap.add_argument("--preload", action="store_true", help="load every model before serving")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up checks
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preload:
        for name in ["smollm2-135m", "tiny-vit", "tiny-clip", "tiny-t2i"] + (["tiny-llava"] if lvlm_available() else []):
            get_model(name)
    app = make_app()
    try:
        url = launch(app, args.host, args.port, prevent_thread_lock=True)
    except OSError as e:  # e.g. the port is taken
        raise SystemExit(f"app.py: error: cannot serve on {args.host}:{args.port or 'the default port'}: {e}")
    print(f"tokenprune app running at {url}  (Ctrl+C stops it)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        app.close()


if __name__ == "__main__":
    main()
