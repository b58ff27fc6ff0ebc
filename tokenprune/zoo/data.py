"""Small evaluation / training data sets that installed packages ship (no downloads).

* :func:`fashion_mnist` reads the Debian package ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``; files in ``/usr/share/datasets/fashion-mnist``).
* :func:`easy_vqa_shapes` reads the images of the PyPI package ``easy-vqa`` and labels each
  image with its (color, shape), recovered from the package's own question/answer pairs.

Both return plain numpy arrays so callers can pick their own preprocessing. The module imports
nothing from the package at import time, so the training scripts in ``evals/train/`` can load it
by file path without running ``tokenprune/zoo/__init__.py``.
"""
from __future__ import annotations

import gzip
import os
import re
from functools import lru_cache

import numpy as np



def _error(msg: str) -> Exception:
    try:
        from tokenprune.errors import TokenPruneError
    except ImportError:  # loaded by file path outside the package
        return RuntimeError(msg)
    return TokenPruneError(msg)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]

EASY_VQA_COLORS = ["red", "green", "blue", "black", "gray", "teal", "yellow", "brown"]
EASY_VQA_SHAPES = ["circle", "rectangle", "triangle"]
#: the 24 (color, shape) classes, index = color_index * 3 + shape_index
EASY_VQA_CLASSES = [f"{c} {s}" for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images, labels)``: uint8 ``[N, 28, 28]`` and int64 ``[N]``.

    ``split`` is ``"train"`` (60,000) or ``"test"`` (10,000). Class names are
    :data:`FASHION_MNIST_CLASSES`. The returned arrays are read-only (cached).
    """
    prefix = "t10k" if _check_split(split) == "test" else "train"
    img_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")
    if not os.path.exists(img_path):
        raise _error(
            f"Fashion-MNIST not found at {FASHION_MNIST_DIR}; install the Debian package: "
            "apt-get install dataset-fashion-mnist"
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path).astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


_PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "yellow": (255, 255, 0), "brown": (165, 42, 42),
}


def _pixel_label(img: np.ndarray) -> tuple[str, str]:
    """Guess (color, shape) from pixels: the shape is drawn in one exact palette color on a
    pastel background; rectangles fill their bounding box, triangles (apex up) are narrow at
    the top and fill about half of it, circles about 0.78."""
    vals, cnt = np.unique(img.reshape(-1, 3), axis=0, return_counts=True)
    fg = None
    for j in np.argsort(-cnt):
        t = tuple(int(v) for v in vals[j])
        if t in _PALETTE.values():
            fg = t
            break
    if fg is None:
        return "", ""
    color = next(k for k, v in _PALETTE.items() if v == fg)
    mask = (img == np.array(fg, dtype=np.uint8)).all(-1)
    ys, xs = np.nonzero(mask)
    m = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    fill = float(m.mean())
    if fill > 0.95:
        return color, "rectangle"
    widths = m.sum(1)
    q = max(1, len(widths) // 4)
    top_bottom = widths[:q].mean() / max(widths[-q:].mean(), 1e-6)
    return color, ("triangle" if top_bottom < 0.6 and fill < 0.72 else "circle")


def _answer_constraints(questions, answers, image_ids, ids):
    """Per image, the colors / shapes still possible after reading every Q/A pair about it."""
    cand = {i: [set(EASY_VQA_COLORS), set(EASY_VQA_SHAPES)] for i in ids}
    words = EASY_VQA_COLORS + EASY_VQA_SHAPES
    for q, a, i in zip(questions, answers, image_ids):
        if i not in cand:
            continue
        if q.startswith("what"):  # "what color is ...", "what shape ...", "what is the red shape?"
            k = 0 if a in EASY_VQA_COLORS else 1
            cand[i][k] &= {a}
            continue
        hit = [w for w in words if re.search(r"\b" + w + r"\b", q)]
        if len(hit) != 1 or a not in ("yes", "no"):
            continue
        negated = " not " in q or q.startswith("is no ")
        present = (a == "yes") != negated
        k = 0 if hit[0] in EASY_VQA_COLORS else 1
        if present:
            cand[i][k] &= {hit[0]}
        else:
            cand[i][k] -= {hit[0]}
    return cand


@lru_cache(maxsize=2)
def easy_vqa_shapes(split: str = "test") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """easy-vqa images with their color and shape: ``(images, colors, shapes)``.

    ``images`` is uint8 ``[N, 64, 64, 3]`` (train N=4000, test N=1000, sorted by image id);
    ``colors`` / ``shapes`` are int64 indices into :data:`EASY_VQA_COLORS` /
    :data:`EASY_VQA_SHAPES`. The 24-way class index is ``colors * 3 + shapes``
    (names in :data:`EASY_VQA_CLASSES`). Each image shows one shape of one color.

    Labels come from the package's own question/answer pairs (about 80% of images are pinned
    down by them); where the answers leave a choice, a pixel rule picks among the remaining
    candidates (the rule agrees with the answers on all but 1 of the ~4,000 images they pin
    down).
    """
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover
        raise _error("easy-vqa is not installed: pip install easy-vqa") from e
    from PIL import Image

    _check_split(split)
    if split == "train":
        paths = easy_vqa.get_train_image_paths()
        qs, ans, ids = easy_vqa.get_train_questions()
    else:
        paths = easy_vqa.get_test_image_paths()
        qs, ans, ids = easy_vqa.get_test_questions()
    order = sorted(paths)
    cand = _answer_constraints(qs, ans, ids, order)
    images = np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in order])
    colors = np.empty(len(order), dtype=np.int64)
    shapes = np.empty(len(order), dtype=np.int64)
    for n, i in enumerate(order):
        pc, ps = _pixel_label(images[n])
        cc, cs = cand[i]
        c = next(iter(cc)) if len(cc) == 1 else (pc if pc in cc else sorted(cc)[0])
        s = next(iter(cs)) if len(cs) == 1 else (ps if ps in cs else sorted(cs)[0])
        colors[n] = EASY_VQA_COLORS.index(c)
        shapes[n] = EASY_VQA_SHAPES.index(s)
    for arr in (images, colors, shapes):
        arr.setflags(write=False)
    return images, colors, shapes
