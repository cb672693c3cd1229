"""A vocabulary resized for fine-tuning (``resize_token_embeddings``): the rows the checkpoint
holds are compared with it, the added rows are left to ``initialised`` and ``rank_parity``,
and the config's new size is a stated warning, not a drift. Unit tests for the row arithmetic
with a fake reader; real gloo groups for replicas, FSDP1 (the SMP recipe) and FSDP2 with
a fault planted in a kept row and in an added row."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import smpcheck
from smpcheck.expect.vocab import VocabResize, kept_mask, kept_rows_reader, vocab_resize
from smpcheck.shards.pieces import iter_pieces
from smpcheck.shards.selection import Selection, flat_selection
from tests.models import FAMILIES, write_checkpoint

OLD, NEW = 96, 104  # tests.models' vocabulary, and one grown by 8 tokens
ADDED_ROW, KEPT_ROW = 100, 3


# -- the row arithmetic, in process --------------------------------------------------------------
def test_a_resize_is_seen_only_when_config_and_shapes_both_say_so() -> None:
    resize = vocab_resize({"vocab_size": OLD}, {"vocab_size": NEW})
    assert resize == VocabResize(OLD, NEW) and resize.kept == OLD
    assert resize.covers((OLD, 32), (NEW, 32))
    assert not resize.covers((OLD, 32), (NEW, 16))  # another dimension changed too
    assert not resize.covers((OLD, 32), (OLD, 32))  # the tensor was not resized
    assert not resize.covers((32, OLD), (32, NEW))  # rows are the vocabulary, not columns
    assert vocab_resize({"vocab_size": OLD}, {"vocab_size": OLD}) is None
    nested = vocab_resize({"text_config": {"vocab_size": OLD}}, {"text_config": {"vocab_size": 90}})
    assert nested == VocabResize(OLD, 90) and nested.kept == 90


def test_kept_rows_are_read_and_added_rows_masked_for_any_selection() -> None:
    stored = torch.arange(OLD * 4, dtype=torch.float32).reshape(OLD, 4)
    boxes: list = []

    def read(box):
        boxes.append(box)
        return stored[tuple(slice(a, b) for a, b in box)]

    full = torch.cat([stored, torch.full((NEW - OLD, 4), -1.0)])
    row_shard = Selection((NEW, 4), (((52, 104),), ((0, 4),)))  # rank 1 of 2: crosses OLD
    flat = flat_selection((NEW, 4), (((52, 104),), ((0, 4),)), (150, 190))  # an FSDP1 range
    for selection in (row_shard, flat):
        boxes.clear()
        expected = selection.assemble(kept_rows_reader(read, OLD))
        mask = kept_mask(selection, OLD)
        held = selection.take(full)
        assert expected.shape == mask.shape == held.shape
        assert torch.equal(expected[mask], held[mask]) and not mask.all() and mask.any()
        assert all(b[0][1] <= OLD for b in boxes), boxes  # nothing read past the file's rows


# -- real groups ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    cls, kwargs = FAMILIES["llama-gqa-untied"]
    return write_checkpoint(cls(**kwargs), tmp_path_factory.mktemp("vocab") / "llama", seed=5)


def resized(path: str, layout: str):
    from reference_impl import (
        DelayedParamIniter,
        apply_fsdp1,
        apply_fsdp2,
        load_on_rank0,
        resize_vocabulary,
    )

    rank = dist.get_rank()
    torch.manual_seed(0)  # replicas draw the same added rows
    model = resize_vocabulary(load_on_rank0(path, rank=0 if layout == "replicas" else rank),
                              NEW)
    if layout == "replicas":
        return model
    initer = DelayedParamIniter(model, device="cpu") if rank else None
    apply = apply_fsdp1 if layout == "fsdp1" else apply_fsdp2
    return apply(model, device="cpu", initer=initer)


def verdicts(model, path: str) -> dict:
    report = smpcheck.verify(model, checkpoint=path)
    return {r.name: (r.status.value, sorted({f.tensor for f in r.errors}),
                     sorted({f.tensor for f in r.findings if f.severity == "warning"}))
            for r in report.results} | {"sources": report.expected.get("sources", {})}


def planted(model, path: str, row: int, fill) -> dict:
    """Verdicts with ``fill`` applied to global ``row`` of the input embeddings, wherever a
    rank holds it, then undone."""
    undo = []
    with torch.no_grad():
        for piece in iter_pieces(model):
            if piece.name != "model.embed_tokens.weight":
                continue
            rows = piece.selection.assemble(lambda box: torch.arange(*box[0]).view(-1, 1).expand(
                box[0][1] - box[0][0], box[1][1] - box[1][0]))
            hit = rows == row
            undo.append((piece.data, hit, piece.data[hit].clone()))
            piece.data[hit] = fill(piece.data[hit])
    out = verdicts(model, path)
    with torch.no_grad():
        for data, hit, saved in undo:
            data[hit] = saved
    return out


def every_case(path: str, layout: str) -> dict:
    model = resized(path, layout)
    return {"clean": verdicts(model, path),
            "kept": planted(model, path, KEPT_ROW, lambda x: x + 0.01),
            "added": planted(model, path, ADDED_ROW, lambda x: torch.full_like(x, float("nan")))}


def failed(verdict: dict) -> dict:
    return {n: v for n, v in verdict.items() if n != "sources" and v[0] in ("fail", "error")}


@pytest.mark.parametrize("layout", ["replicas", "fsdp1", "fsdp2"])
def test_resized_vocabulary_passes_clean_and_names_faults_in_kept_and_added_rows(
        ranks, causal_lm, layout) -> None:
    out = ranks(every_case, 2, args=(str(causal_lm), layout))[0]
    assert not failed(out["clean"]), out["clean"]
    assert out["clean"]["config_parity"][2] == ["config.vocab_size"], out["clean"]
    for group in ("model.embed_tokens.weight", "lm_head.weight"):  # the report says which rows
        assert out["clean"]["sources"][group] == [
            f"checkpoint rows [0:{OLD}), rows added by a resize judged by initialised"], group
    kept = {"checkpoint_parity": ("fail", ["model.embed_tokens.weight"], [])}
    if layout == "fsdp2":  # a DTensor shard: tp_shards judges it against its slice too (the
        # root unit, embeddings included, is sharded again after the clean run's forward)
        kept["tp_shards"] = ("fail", ["model.embed_tokens.weight"], [])
    assert failed(out["kept"]) == kept, out["kept"]
    bad = failed(out["added"])
    assert set(bad) == {"initialised"} and bad["initialised"][1] == [
        "model.embed_tokens.weight"], out["added"]


def config_only_drift(path: str) -> dict:
    from reference_impl import load_on_rank0

    model = load_on_rank0(path, rank=0)
    model.config.vocab_size = NEW  # the config says resized; the tensors were not
    return verdicts(model, path)


def test_a_vocabulary_size_changed_without_the_tensors_stays_a_drift(ranks, causal_lm) -> None:
    out = ranks(config_only_drift, 1, args=(str(causal_lm),))[0]
    assert out["config_parity"][:2] == ("fail", ["config.vocab_size"]), out
