"""Tiny random decoders built from config dicts, one per supported family, plus SmolLM2."""
import pytest
import torch
import transformers as T

# Tiny models run faster on one thread, and a shared CI machine does not thrash.
torch.set_num_threads(1)

# Property tests (tests/test_properties.py): a small, repeatable default that fits the suite's
# budget; `pytest --hypothesis-profile=thorough` draws many more (and new) examples.
from hypothesis import HealthCheck, settings  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("quick", max_examples=20, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=150, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile("quick")

COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=None, bos_token_id=1,
)
FAMILIES = {
    "llama-sdpa": (T.LlamaConfig, T.LlamaForCausalLM, dict(attn_implementation="sdpa")),
    "llama-eager": (T.LlamaConfig, T.LlamaForCausalLM, dict(attn_implementation="eager")),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(attn_implementation="sdpa")),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(attn_implementation="sdpa")),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(attn_implementation="eager", sliding_window=None)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(attn_implementation="sdpa", sliding_window=64)),
}


def tiny_decoder(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=sorted(FAMILIES))
def decoder(request):
    return tiny_decoder(request.param)


@pytest.fixture(scope="session")
def smollm2():
    import tokenprune as tp

    return tp.zoo.load("smollm2-135m")


VIT = dict(image_size=32, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
           num_attention_heads=4, intermediate_size=128, num_labels=10)
ENCODERS = ["vit-sdpa", "vit-eager", "deit", "open_clip", "clip"]


def tiny_encoder(kind: str, seed: int = 0):
    """(model, forward) with forward(pixels) -> the output a user reads."""
    torch.manual_seed(seed)
    if kind == "open_clip":
        import open_clip

        model = open_clip.model.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, layers=4, width=64, patch_size=4, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=2),
        ).eval()
        return model, model.encode_image
    if kind == "deit":
        model = T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**VIT)).eval()
        return model, lambda x: model(x).logits
    if kind == "clip":  # the tower class LLaVA holds; read as LLaVA does (hidden_states[-2]) and pooled
        config = {k: v for k, v in VIT.items() if k != "num_labels"}
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**config, attn_implementation="sdpa")).eval()

        def forward(x):
            out = model(x, output_hidden_states=-2)
            return torch.cat([out.hidden_states[-2], out.pooler_output[:, None]], dim=1)

        with torch.no_grad():  # transformers installs its hidden-state recorders (hooks) on the first such call
            forward(torch.zeros(1, 3, 32, 32))
        return model, forward
    impl = kind.split("-")[1]
    model = T.ViTForImageClassification(T.ViTConfig(**VIT, attn_implementation=impl)).eval()
    return model, lambda x: model(x).logits


@pytest.fixture(params=ENCODERS)
def encoder(request):
    return tiny_encoder(request.param)


LLAVA_IMAGE_TOKEN = 127


def tiny_llava(seed: int = 0, feature_layer: int = -1, vision_attn: str = "sdpa"):
    """A random LlavaForConditionalGeneration: 2-layer CLIP tower (32x32 images, 4x4 patch grid), 4-layer Llama."""
    torch.manual_seed(seed)
    vision = T.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    text = T.LlamaConfig(**COMMON, attn_implementation="sdpa")
    config = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN,
                           vision_feature_layer=feature_layer, vision_feature_select_strategy="default")
    model = T.LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.config._attn_implementation = vision_attn  # LlavaConfig resets sub-configs' choice
    model.generation_config.pad_token_id = 0
    return model


def llava_inputs(questions=(9, 5), images_per_prompt=1, seed=0):
    """Left-padded batch: row b = [bos, <image> x 16 per image, `questions[b]` random text tokens]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for q in questions:
        ids = [1]
        for _ in range(images_per_prompt):
            ids += [LLAVA_IMAGE_TOKEN] * 16 + [5]
        ids += torch.randint(6, 120, (q,), generator=g).tolist()
        rows.append(ids)
    n = max(map(len, rows))
    input_ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, ids in enumerate(rows):
        input_ids[b, n - len(ids):], mask[b, n - len(ids):] = torch.tensor(ids), 1
    pixels = torch.randn(len(rows) * images_per_prompt, 3, 32, 32, generator=g)
    return dict(input_ids=input_ids, attention_mask=mask, pixel_values=pixels)


def cache_bytes(cache) -> int:
    """Bytes a KV cache holds; a layer never written (a block no token ran, e.g. ShortGPT's) holds none."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)
