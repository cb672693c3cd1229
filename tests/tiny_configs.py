"""Tiny configs and checkpoints for any architecture transformers knows.

An architecture sweep cannot hand-write two hundred configs, so each one is the config class's
own defaults shrunk *generically*: every (sub-)config's well-known size fields are made small,
keeping the relations the modelling code relies on (heads divide the width, key/value heads
divide the heads, per-layer lists as long as the layers, special token ids inside the
vocabulary). Layers are picked so that each distinct kind of layer of the default config (a
sliding and a full attention layer, a dense and a sparse MLP) survives the cut.

Only fields the caller would set by hand are changed; fields the class derives itself (a
``head_dim`` or ``layer_types`` that defaults to None) are left for the class to derive, by
rebuilding the config from the changed fields instead of editing the instance. When the
smallest profile cannot be built, larger ones are tried; when none can, transformers' own
error for the smallest is raised.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig

# mapping name -> (the auto-mapping table in modeling_auto, the Auto class that builds it)
MAPPINGS: dict[str, tuple[str, str]] = {
    "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image_text_to_text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                           "AutoModelForImageTextToText"),
    "sequence_classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                                "AutoModelForSequenceClassification"),
}
MAX_PARAMETERS = 20_000_000  # a tiny model that is not tiny tells the shrinking missed a field


class TooLarge(ValueError):
    """Shrunk, the model is still over :data:`MAX_PARAMETERS`: larger profiles would be too."""


@dataclass(frozen=True)
class Profile:
    """Target sizes of one shrinking attempt."""

    hidden: int
    heads: int
    ffn: int
    moe_ffn: int
    experts: int
    vocab: int
    positions: int
    max_layers: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PROFILES = (
    Profile(hidden=64, heads=4, ffn=128, moe_ffn=32, experts=4, vocab=256, positions=256),
    Profile(hidden=128, heads=4, ffn=256, moe_ffn=64, experts=4, vocab=256, positions=512),
    Profile(hidden=256, heads=8, ffn=512, moe_ffn=64, experts=8, vocab=512, positions=2048),
)

WIDTH = {"hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "model_dim",
         "word_embed_proj_dim", "embedding_size", "out_hidden_size", "hidden_size_global",
         "attention_hidden_size", "backbone_hidden_size", "projection_dim", "emb_dim"}
FFN = {"intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim",
       "ffn_hidden_size", "dim_ff", "dff", "intermediate_size_mlp", "mlp_dim"}
MOE_FFN = {"moe_intermediate_size", "shared_expert_intermediate_size",
           "shared_experts_intermediate_size", "shared_intermediate_size",
           "expert_intermediate_size", "expert_ffn_hidden_size"}
# Widths the modelling code takes as a multiple of the same config's width (Zamba attends over
# [hidden, embeddings]); other widths (``hidden_size_global``) must equal a width elsewhere.
MULTIPLE_WIDTH = {"attention_hidden_size"}
PRIMARY_WIDTH = ("hidden_size", "d_model", "n_embd", "n_embed", "emb_dim")
PRIMARY_HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
# In order of preference: the first present is the count per-layer lists are measured against.
LAYERS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers",
          "encoder_layers", "num_decoder_layers", "num_encoder_layers", "depth",
          "conf_num_hidden_layers")
# Ints that count layers out of the total: scaled with it, kept >= 1 when they were.
LAYER_COUNTS = {"first_k_dense_replace", "num_dense_layers", "num_kv_shared_layers",
                "moe_layer_start_index", "max_window_layers"}
HEADS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
         "decoder_attention_heads", "attention_heads", "conf_num_attention_heads",
         "swa_num_attention_heads", "index_n_heads", "linear_num_heads",
         "linear_num_value_heads", "mamba_n_heads"}
# key/value-head field -> the head count it must divide
KV_HEADS = {"num_key_value_heads": "num_attention_heads", "num_kv_heads": "num_attention_heads",
            "kv_n_heads": "n_heads", "swa_num_key_value_heads": "swa_num_attention_heads",
            "linear_num_key_heads": "linear_num_value_heads",
            "multi_query_group_num": "num_attention_heads"}
HEAD_DIM = {"head_dim", "d_kv", "dim_head", "attention_head_dim", "kv_channels",
            "linear_key_head_dim", "linear_value_head_dim", "swa_head_dim", "index_head_dim",
            "linear_head_dim", "mamba_d_head", "v_head_dim"}
HALF_HEAD_DIM = {"qk_nope_head_dim", "qk_rope_head_dim"}  # MLA: the two halves of a q/k head
LOW_RANK = {"kv_lora_rank", "q_lora_rank", "o_lora_rank", "time_step_rank", "mamba_dt_rank",
            "laurel_rank", "hc_lowrank", "gated_norm_rank"}
EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
           "zero_expert_num"}
TOP_K = {"num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "num_experts_per_token"}
ONE = {"n_group", "topk_group", "num_expert_group", "n_shared_experts", "num_shared_experts",
       "moe_num_shared_experts", "n_groups", "mamba_n_groups"}
STATE = {"state_size", "mamba_d_state", "ssm_state_size", "d_state"}
POSITIONS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
             "max_sequence_length", "max_target_positions", "max_source_positions",
             "original_max_position_embeddings", "model_max_length"}
# (heads, head size, expansion) whose product is the expanded width in SSM blocks
SSM_HEADS = (("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head",
                                                    "mamba_expand"))


def mapped_types(mapping: str) -> list[str]:
    """The model types of one of transformers' auto mappings (empty where this release lacks
    it), in the mapping's own order."""
    from transformers.models.auto import modeling_auto

    table, _ = MAPPINGS[mapping]
    return list(getattr(modeling_auto, table, None) or {})


def mapped_class(model_type: str, mapping: str) -> str:
    """The class name the mapping builds for ``model_type``."""
    from transformers.models.auto import modeling_auto

    table, _ = MAPPINGS[mapping]
    name = (getattr(modeling_auto, table, None) or {}).get(model_type, "")
    return name if isinstance(name, str) else ",".join(name)


def auto_class(mapping: str) -> Any:
    """The Auto class (``AutoModelForCausalLM``, ...) for a mapping name."""
    import transformers

    return getattr(transformers, MAPPINGS[mapping][1])


def _init_params(cls: type) -> set[str]:
    return {n for n, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first(fields: dict[str, Any], names: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of ``names`` that ``fields`` holds as a positive int, with its value."""
    for name in names:
        if _is_int(fields.get(name)) and fields[name] > 0:
            return name, fields[name]
    return None


def _layer_count(fields: dict[str, Any]) -> tuple[str, int] | None:
    for name in LAYERS:
        if _is_int(fields.get(name)) and fields[name] > 0:
            return name, fields[name]
    return None


def _is_index_list(name: str, value: Any, layers: int) -> bool:
    """A list of layer indices (``mlp_only_layers``, ``moe_layers``), strictly increasing."""
    return ("layer" in name and isinstance(value, list) and bool(value)
            and all(_is_int(v) and 0 <= v < layers for v in value)
            and all(a < b for a, b in zip(value, value[1:]))
            and not (len(value) == layers and set(value) <= {0, 1} and layers > 2))


def _is_per_layer(name: str, value: Any, layers: int) -> bool:
    """A list with one entry per layer, or a pattern string with one letter per layer
    (``hybrid_override_pattern``; not any word that happens to be as long)."""
    if isinstance(value, str):
        return ("pattern" in name or "layer" in name) and len(value) == layers
    return isinstance(value, list) and len(value) == layers


def pick_layers(fields: dict[str, Any], layers: int, most: int) -> list[int]:
    """Indices of the layers to keep: the first of each distinct kind of layer (the values
    every per-layer list and index list gives it), then a second of each kind while fewer
    than ``most`` (a block shared between the layers of one kind needs two to be shared),
    at least two in all."""
    per_layer = [v for k, v in fields.items()
                 if not _is_index_list(k, v, layers) and _is_per_layer(k, v, layers)]
    indexed = [set(v) for k, v in fields.items() if _is_index_list(k, v, layers)]
    kinds: dict[tuple, list[int]] = {}
    for i in range(layers):
        kind = tuple(repr(v[i]) for v in per_layer) + tuple(i in s for s in indexed)
        kinds.setdefault(kind, []).append(i)
    firsts = [found[0] for found in kinds.values()]
    seconds = [found[1] for found in kinds.values() if len(found) > 1]
    keep = sorted(firsts[:most])
    for i in seconds:
        if len(keep) < most and len(kinds) > 1:
            keep = sorted([*keep, i])
    for i in range(layers):
        if len(keep) >= min(2, layers):
            break
        if i not in keep:
            keep = sorted([*keep, i])
    return keep


def _heads(old_heads: int, old_kv: int | None, new_heads: int) -> tuple[int, int | None]:
    """New (heads, kv heads): multi-head stays multi-head, MQA stays MQA, GQA stays GQA."""
    heads = min(old_heads, new_heads)
    if old_kv is None:
        return heads, None
    if old_kv >= old_heads:
        return heads, heads
    if old_kv == 1 or heads < 2:
        return heads, 1
    return heads, max(1, heads // 2)


def shrink_fields(fields: dict[str, Any], profile: Profile) -> dict[str, Any]:
    """The changed size fields of one (sub-)config's ``fields`` (its attributes), without
    the sub-configs (shrunk on their own) and without special token ids (see
    :func:`remap_token_ids`)."""
    p = profile
    new: dict[str, Any] = {}

    def cap(name: str, limit: int) -> None:
        value = fields.get(name)
        if _is_int(value) and value > limit:
            new[name] = limit
        elif isinstance(value, list) and value and all(_is_int(v) for v in value):
            new[name] = [min(v, limit) for v in value]  # one width per layer

    primary = _first(fields, PRIMARY_WIDTH)
    for name in fields:
        if name in MULTIPLE_WIDTH and primary and _is_int(fields[name]) \
                and fields[name] > p.hidden and fields[name] % primary[1] == 0:
            new[name] = fields[name] // primary[1] * p.hidden  # a multiple of the width stays
        elif name in WIDTH:
            cap(name, p.hidden)
        elif name in FFN:
            cap(name, p.ffn)
        elif name in MOE_FFN:
            cap(name, p.moe_ffn)
        elif name in EXPERTS:
            cap(name, p.experts)
        elif name in TOP_K:
            cap(name, 2)
        elif name in ONE:
            cap(name, 1)
        elif name in STATE:
            cap(name, 16)
        elif name in LOW_RANK:
            cap(name, 2 * p.head_dim)
        elif name in HEAD_DIM:
            cap(name, p.head_dim)
        elif name in HALF_HEAD_DIM:
            cap(name, p.head_dim // 2)
        elif name in POSITIONS:
            cap(name, p.positions)
        elif "vocab" in name:
            cap(name, p.vocab)
    _shrink_heads(fields, new, p)
    _shrink_equal_widths(fields, new)
    _shrink_derived(fields, new, p)
    _shrink_layers(fields, new, p)
    _shrink_images(fields, new)
    return new


def _shrink_heads(fields: dict[str, Any], new: dict[str, Any], p: Profile) -> None:
    paired = {heads: kv for kv, heads in KV_HEADS.items() if kv in fields}
    for name in HEADS & set(fields):
        if not _is_int(fields[name]) or fields[name] <= 0:
            continue
        kv_name = paired.get(name)
        kv = fields.get(kv_name) if kv_name else None
        heads, kv = _heads(fields[name], kv if _is_int(kv) else None, p.heads)
        new[name] = heads
        if kv is not None:
            new[kv_name] = kv
    for kv_name in set(KV_HEADS) & set(fields):  # kv heads whose head count is elsewhere
        if kv_name not in new and _is_int(fields[kv_name]) and fields[kv_name] > 2:
            new[kv_name] = 2


def _shrink_equal_widths(fields: dict[str, Any], new: dict[str, Any]) -> None:
    """Other width fields that equal the hidden (or MLP) width by default keep equalling it:
    an adapter's input size that must match the hidden size, a per-block MLP width."""
    for known, words in ((("hidden_size", "d_model", "n_embd"), ("dim", "size", "hidden")),
                         (("intermediate_size",), ("intermediate", "ffn"))):
        source = next((n for n in known if n in new and _is_int(fields.get(n))), None)
        if source is None or fields[source] < 128:  # small values match by coincidence
            continue
        for name, value in fields.items():
            if (name not in new and _is_int(value) and value == fields[source]
                    and any(w in name for w in words) and "vocab" not in name
                    and name not in POSITIONS):
                new[name] = new[source]


def _shrink_derived(fields: dict[str, Any], new: dict[str, Any], p: Profile) -> None:
    """Fields defined by others in the default config, kept so: a rotary size as a fraction
    of the head, an attention scale equal to the head size, an SSM's heads x head size equal
    to its expanded width, an MLA head that is the sum of its halves."""
    def now(name: str) -> Any:
        return new.get(name, fields.get(name))

    width, count = _first(fields, PRIMARY_WIDTH), _first(fields, PRIMARY_HEADS)
    hidden = fields.get("hidden_size")
    old_head = fields.get("head_dim") if _is_int(fields.get("head_dim")) else (
        width[1] // count[1] if width and count else None)
    new_head = now("head_dim") if _is_int(now("head_dim")) else (
        now(width[0]) // now(count[0]) if width and count else p.head_dim)
    for name in ("rotary_dim", "rotary_emb_base_dim"):
        value = fields.get(name)
        if _is_int(value) and old_head and value > 0:
            new[name] = max(2, (new_head * value // old_head) // 2 * 2)
    value = fields.get("query_pre_attn_scalar")
    if _is_int(value) and value == old_head:
        new["query_pre_attn_scalar"] = new_head
    nope, rope, qk = (fields.get(n) for n in ("qk_nope_head_dim", "qk_rope_head_dim",
                                               "qk_head_dim"))
    if all(_is_int(v) for v in (nope, rope, qk)) and qk == nope + rope:
        new["qk_head_dim"] = now("qk_nope_head_dim") + now("qk_rope_head_dim")
    for heads_name, dim_name, expand_name in SSM_HEADS:
        n, d, e = (fields.get(x) for x in (heads_name, dim_name, expand_name))
        if all(_is_int(v) for v in (n, d, e, hidden)) and n * d == e * hidden:
            new[heads_name] = max(1, e * now("hidden_size") // now(dim_name))
    for name in ("mamba_d_ssm", "mamba_intermediate_size"):
        value = fields.get(name)
        if _is_int(value) and _is_int(hidden) and value % hidden == 0:
            new[name] = value // hidden * now("hidden_size")


def _shrink_layers(fields: dict[str, Any], new: dict[str, Any], p: Profile) -> None:
    counted = _layer_count(fields)
    if counted is None:
        return
    _, layers = counted
    keep = pick_layers(fields, layers, p.max_layers) if layers > p.max_layers else \
        list(range(layers))
    kept = len(keep)
    for name in LAYERS:
        value = fields.get(name)
        if _is_int(value) and value > 0:
            new[name] = kept if value == layers else min(value, 2)
    if kept == layers:
        return
    position = {old: i for i, old in enumerate(keep)}
    for name, value in fields.items():
        if _is_index_list(name, value, layers):
            new[name] = [position[v] for v in value if v in position]
        elif _is_per_layer(name, value, layers):
            value = new.get(name, value)  # a per-layer width already capped
            picked = [value[i] for i in keep]
            new[name] = "".join(picked) if isinstance(value, str) else picked
        elif name in LAYER_COUNTS and _is_int(value) and value > 0:
            new[name] = min(kept, max(1, round(value * kept / layers)))
    value = fields.get("moe_layer_end_index")
    if _is_int(value) and value == layers - 1:
        new["moe_layer_end_index"] = kept - 1


def _shrink_images(fields: dict[str, Any], new: dict[str, Any]) -> None:
    image, patch = fields.get("image_size"), fields.get("patch_size")
    if _is_int(image) and _is_int(patch) and patch > 0:
        patch = min(patch, 8)
        new["patch_size"] = patch
        new["image_size"] = min(image, 4 * patch)


def token_id_fields(fields: dict[str, Any]) -> list[str]:
    return [n for n in fields if n.endswith(("_token_id", "_token_ids", "_token_index"))]


def remap_token_ids(value: Any, vocab: int, table: dict[int, int]) -> Any:
    """A special token id (or list of them) moved inside a vocabulary of ``vocab``: ids
    already inside stay; each other id gets its own slot counted down from the top, the same
    slot wherever it appears (``table``)."""
    if isinstance(value, list):
        return [remap_token_ids(v, vocab, table) for v in value]
    if not _is_int(value) or value < vocab:
        return value
    if value not in table:
        table[value] = vocab - 1 - len(table)
    return table[value]


def _shrunk(config: PretrainedConfig, profile: Profile, table: dict[int, int],
            decoder: bool = False) -> PretrainedConfig:
    """``config`` rebuilt through its class with its size fields (and sub-configs) shrunk;
    with ``decoder``, an encoder family's ``is_decoder`` switched on, as its causal-LM class
    requires."""
    cls = type(config)
    params = _init_params(cls)
    fields = {k: v for k, v in vars(config).items() if not k.startswith("_")}
    new = shrink_fields(fields, profile)
    for name, value in fields.items():
        if isinstance(value, PretrainedConfig):  # as a dict, as from_pretrained passes it:
            # the class then derives what it derives on load (a sub-config's input width
            # from the top config's), and the saved config reloads as it was built
            new[name] = _shrunk(value, profile, table).to_dict()
    vocab = new.get("vocab_size", fields.get("vocab_size"))
    vocab = vocab if _is_int(vocab) else profile.vocab
    for name in token_id_fields(fields):
        moved = remap_token_ids(fields[name], min(vocab, profile.vocab), table)
        if moved != fields[name]:
            new[name] = moved
    if decoder and fields.get("is_decoder") is False:
        new["is_decoder"] = True
    # Only what the class takes as arguments; what it derives it derives again.
    kwargs = {k: v for k, v in new.items() if k in params}
    return cls(**kwargs)


def _build(config: PretrainedConfig, mapping: str) -> nn.Module:
    model = auto_class(mapping).from_config(config)
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise TooLarge(f"{type(model).__name__} still has {count / 1e6:.1f}M parameters "
                         f"after shrinking (limit {MAX_PARAMETERS / 1e6:.0f}M): a size field "
                         "the shrinking does not know")
    return model


def tiny_model(model_type: str, mapping: str = "causal_lm",
               seed: int = 0) -> tuple[PretrainedConfig, nn.Module]:
    """The first profile's config that builds, with the model built from it.

    Raises:
        Exception: transformers' own error for the smallest profile when none builds.
    """
    first: Exception | None = None
    for profile in PROFILES:
        try:
            config = _shrunk(CONFIG_MAPPING[model_type](), profile, {},
                             decoder=mapping == "causal_lm")
            torch.manual_seed(seed)
            return config, _build(config, mapping)
        except TooLarge as exc:
            first = first or exc
            break
        except Exception as exc:  # noqa: BLE001 - any build error; the first is reported
            first = first or exc
    assert first is not None
    raise first


def tiny_config(model_type: str, mapping: str = "causal_lm") -> PretrainedConfig:
    """``CONFIG_MAPPING[model_type]()`` shrunk to a tiny size, checked by building the
    mapping's model from it.

    Raises:
        Exception: transformers' own error when the model cannot be built from any profile.
    """
    return tiny_model(model_type, mapping)[0]


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Seeded noise on every parameter, so no tensor equals its init by accident (a norm
    weight of ones, a zero bias) and a wrong source shows in the comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.add_(noise.to(param.dtype) * 0.05)
    return model


def write_tiny_checkpoint(model_type: str, mapping: str, path: str | Path,
                          seed: int = 0) -> Path:
    """Build the mapping's model from the tiny config, perturb it, ``save_pretrained``.

    Raises:
        Exception: transformers' own error when the model cannot be built, or a ValueError
            when it is over :data:`MAX_PARAMETERS` after shrinking.
    """
    _, model = tiny_model(model_type, mapping, seed)
    perturb(model, seed).save_pretrained(path)
    return Path(path)
