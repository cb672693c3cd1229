"""config parity: the config each rank runs with is the checkpoint's ``config.json``, the same
on every rank, and the buffers computed from it are the ones the model holds.

A field lost or changed between ``config.json`` and the config object the model runs with (a
loader or a save/reload round trip drops ``rope_scaling``, say) leaves the rotary buffers
computed from the wrong config; ``initialised`` recomputes them from that same wrong config and
agrees. Here the file is loaded through the running config's own class (so defaults that
transformers fills in on load, and its renames of old fields, are the same on both sides) and
compared field by field; the buffers are recomputed from the file's config and compared too.

The raw ``config.json`` is compared too: a field the file holds that the config class itself
changes on load (a released bug reset a rotary field on every reload) is invisible to the
comparison above, since both sides come through the same class.

Which differences are benign is read off the class hierarchy, not listed by hand, each field
judged at its own (sub-)config (``text_config.dtype`` is a generic field of the text config,
not an architecture field called ``text_config``): fields that
every ``PretrainedConfig`` has (provenance, output switches, label names, dtype) steer loading
and outputs, not the architecture's math, so they are warnings (dtype not even that when it is
the parameters' own dtype). Fields the model's own config class declares are errors, except
those that steer training and data rather than the network's function, which fine-tuning
scripts set on purpose: dropout rates (active only in training), special token ids (padding
and pooling), the init range (fresh tensors only) and ``use_cache`` (gradient checkpointing
turns it off). Fields whose names start with ``_`` are transformers' runtime internals.
Overrides the user declares (``verify(config_overrides=...)``; ``smpcheck run`` passes its
``--num-labels`` and ``--config``) are applied to the file's config before comparing, exactly
as ``from_pretrained(path, **overrides)`` applies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from smpcheck.checks.base import CheckContext, Skip, merge_findings, ranked, result
from smpcheck.expect.skeleton import buffers_of, model_class, skeleton_of
from smpcheck.report.model import CheckResult, Finding

PROVENANCE = ("_name_or_path", "transformers_version")  # where and by which version it was saved
TRAINING_FIELDS = ("initializer_range", "use_cache")  # plus *dropout* and *_token_id(s)
CLASS_HINT = ("the config class does not give back the value it saved: every reload of this "
              "checkpoint builds the model from the class's value, not the file's; set the "
              "field after loading (and file a bug with the config class), or pass it as an "
              "override on every rank")
DRIFT_HINT = ("the config the model runs with lost or changed this field on the way from "
              "config.json: load the config from the checkpoint unchanged (or pass the same "
              "override on every rank), then rebuild the model and its buffers; if you changed "
              "it on purpose, declare it: verify(config_overrides={...})")


@dataclass
class Summary:
    fields: dict[str, Any]  # this rank's running config, flattened to dotted names
    findings: list[Finding]  # this rank's differences from config.json
    compared_with_file: bool


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts (``rope_parameters``, ``text_config``) as dotted field names."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))  # JSON-equal, picklable
    return out


def _generic_fields() -> set[str]:
    from transformers import PretrainedConfig

    return set(PretrainedConfig().to_dict())


def steers_training(field: str) -> bool:
    """A field that steers training or data handling, not what the network computes."""
    return (field in TRAINING_FIELDS or "dropout" in field
            or field.endswith(("_token_id", "_token_ids")))


def own_field(path: str, config: Any = None) -> str:
    """The config field a dotted path belongs to, at its leaf config: ``text_config.dtype``
    is the text sub-config's ``dtype`` (a generic field), ``rope_parameters.rope_theta`` the
    top config's ``rope_parameters``. Sub-configs are found on the config object itself
    (any attribute that is a ``PretrainedConfig``), not guessed from names."""
    from transformers import PretrainedConfig

    parts = path.split(".")
    for part in parts:
        child = getattr(config, part, None) if config is not None else None
        if not isinstance(child, PretrainedConfig):
            return part
        config = child
    return parts[-1]


def classify(field: str, generic: set[str], config: Any = None) -> str | None:
    """"error", "warning", or None (not worth a word) for a field whose values differ,
    judged by the field it is at its own (sub-)config."""
    own = own_field(field, config)
    if own in PROVENANCE or own.startswith("_") or field.startswith("_"):
        return None
    if own in generic or steers_training(own):
        return "warning"
    return "error"


def differences(want: dict[str, Any], seen: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, value in ``want``, value in ``seen``) for every field that differs; a field
    one side lacks is ``"(absent)"`` there."""
    absent = "(absent)"
    return [(f, want.get(f, absent), seen.get(f, absent))
            for f in sorted(set(want) | set(seen)) if want.get(f, absent) != seen.get(f, absent)]


def _resized(ctx: CheckContext) -> bool:
    """Whether the model's tensors were resized as the config's vocabulary was: then the
    config's new size is the user's, not a drift."""
    if ctx.checkpoint is None or ctx.expectations.resize is None:
        return False
    sources, _ = ctx.one_pass
    return any(source.rows is not None for _, source in sources)


def _param_dtype(model: torch.nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return str(dtype).removeprefix("torch.") if dtype is not None else ""


class ConfigParity:
    name = "config_parity"

    def summarize(self, ctx: CheckContext) -> Summary | Skip:
        config = ctx.config
        if config is None or not hasattr(config, "to_dict"):
            return Skip("not a transformers model: it has no config to compare")
        running = flatten(config.to_dict())
        folder = ctx.checkpoint
        if folder is not None and not folder.is_dir():  # a single .safetensors file
            folder = folder.parent
        if folder is None or not (folder / "config.json").exists():
            return Summary(running, [], False)
        saved = type(config).from_pretrained(folder, **ctx.config_overrides)
        loaded = flatten(saved.to_dict())
        findings = self._field_findings(ctx, loaded, running)
        findings += self._class_findings(ctx, folder, loaded, running)
        findings += self._buffer_findings(ctx, saved, findings)
        return Summary(running, findings, True)

    def _class_findings(self, ctx: CheckContext, folder: Path, loaded: dict,
                        running: dict) -> list[Finding]:
        """Fields that ``config.json`` holds but the config class changes on load, so both
        the file's config and the running one carry the class's value and agree on it.

        Only for a file written by this same transformers release: then loading must give
        back what saving wrote, and a field reset on every reload is the class's bug. A file
        from another release may be migrated on load (old fields renamed or normalised), so
        there a change is a warning. A null in the file is a default the class fills in."""
        try:  # transformers' own reader: it decodes what its writer encodes (infinity)
            raw = type(ctx.config)._dict_from_json_file(folder / "config.json")
        except (OSError, ValueError):
            return []
        raw = flatten({**raw, **ctx.config_overrides})
        import transformers

        same_release = raw.get("transformers_version") == transformers.__version__
        generic, findings = _generic_fields(), []
        for field, want, seen in differences(raw, loaded):
            severity = classify(field, generic, ctx.config)
            if (severity is None or want is None or "(absent)" in (want, seen)
                    or running.get(field) != seen):
                continue  # a default filled in, a renamed field, or drift (named above)
            if severity == "error" and not same_release:
                severity = "warning"
            findings.append(Finding(
                f"config.{field}", [ctx.rank], f"config.json holds {json.dumps(want)}, but "
                f"{type(ctx.config).__name__} changes it to {json.dumps(seen)} on load",
                json.dumps(want), json.dumps(seen), CLASS_HINT if severity == "error" else
                "written by another transformers release: a migration on load, or a loss",
                severity))
        return findings

    def _field_findings(self, ctx: CheckContext, saved: dict, running: dict) -> list[Finding]:
        generic = _generic_fields()
        dtype = _param_dtype(ctx.view.base)
        findings = []
        for field, want, seen in differences(saved, running):
            severity = classify(field, generic, ctx.config)
            if severity is None or (own_field(field, ctx.config) in ("dtype", "torch_dtype")
                                    and seen in (dtype, None)):
                continue
            if field.split(".")[-1] == "vocab_size" and _resized(ctx):
                findings.append(Finding(
                    f"config.{field}", [ctx.rank], "the vocabulary was resized and the embeddings "
                    f"follow: {ctx.expectations.resize.words()} are compared with the "
                    "checkpoint, the added rows are judged by initialised and rank_parity",
                    json.dumps(want), json.dumps(seen), severity="warning"))
                continue
            findings.append(Finding(
                f"config.{field}", [ctx.rank],
                "differs from the checkpoint's config.json" if severity == "error" else
                "differs from config.json (a loading or output setting: the math is unchanged)",
                json.dumps(want), json.dumps(seen), DRIFT_HINT if severity == "error" else "",
                severity))
        return findings

    def _buffer_findings(self, ctx: CheckContext, saved: Any,
                         field_findings: list[Finding]) -> list[Finding]:
        fields = [f.tensor for f in field_findings if f.severity == "error"]
        cls = model_class(ctx.view.base)
        if cls is None or not fields:  # the same config computes the same buffers: a wrong
            return []  # buffer is then initialised's to name, not a drift
        expected = buffers_of(skeleton_of(cls, saved))
        because = f"computed from a config whose {', '.join(fields)} differ from config.json"
        findings = []
        for piece in ctx.pieces():
            want = expected.get(ctx.view.base_name(piece.name)[0])
            if want is None or piece.is_param or piece.data.is_meta:
                continue
            want = want.to(piece.data.device, piece.data.dtype)
            if want.shape != piece.data.shape or not torch.equal(want, piece.data):
                findings.append(Finding(piece.name, [ctx.rank], f"buffer {because}",
                                        hint=DRIFT_HINT))
        return findings

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        base_rank, base = present[0]
        findings = merge_findings([s.findings for _, s in present])
        across: dict[tuple, list[int]] = {}
        for rank, summary in present[1:]:
            for field, want, seen in differences(base.fields, summary.fields):
                if classify(field, _generic_fields(), ctx.config) is not None:
                    across.setdefault((field, json.dumps(want), json.dumps(seen)), []).append(rank)
        findings += [Finding(f"config.{field}", ranks, f"differs from rank {base_rank}'s config",
                             want, seen, "every rank must run the same config: build it from the "
                             "same files with the same overrides")
                     for (field, want, seen), ranks in across.items()]
        with_file = any(s.compared_with_file for _, s in present)
        words = (f"{len(base.fields)} fields compared across {len(summaries)} ranks"
                 + (" and with config.json, buffers recomputed from it" if with_file else
                    " (no config.json given: checkpoint=DIR compares with it)"))
        errors = sum(f.severity == "error" for f in findings)
        return result(self.name, findings, f"{words}: the same", f"{words}: {errors} differ")
