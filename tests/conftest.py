"""Tiny random decoders built from config dicts, one per supported family, plus SmolLM2."""
import pytest
import torch
import transformers as T

# Tiny models run faster on one thread, and a shared CI machine does not thrash.
torch.set_num_threads(1)

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
