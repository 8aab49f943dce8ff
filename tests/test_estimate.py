"""``spt estimate``: the steps of a run taken on a backbone built from its config alone (fake tensors,
no weight loaded) give the peak memory the same steps reach on the real model; the largest batch
that fits a memory; the table, the JSON and the refusals."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import make_tiny_decoder, make_tiny_model
from helpers import tiny_config

from search.cli import main
from search.config import load_config
from search.estimate import (
    Estimator,
    LiveMemory,
    Peaks,
    estimate,
    parse_memory,
    worst_layers,
)
from spt import load_backbone
from spt.inputs import EncodedSplit, collate

BATCH, LENGTH = 8, 24


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, object]:
    """Two-layer models (the estimator's cost is per layer and operation, not per weight)."""
    root = tmp_path_factory.mktemp("estimate-models")
    models = {"bert": make_tiny_model(root / "bert", "bert", num_layers=2)}
    models.update({family: make_tiny_decoder(root / family, family, num_layers=2) for family in ("llama", "gpt2")})
    return models


def _config(tmp_path, model_dir, **sections):
    sections["head"] = {"pooling": "auto", **sections.get("head", {})}
    return load_config(tiny_config(tmp_path, model_dir, **sections))


def _path(tmp_path, model_dir):
    return tiny_config(tmp_path, model_dir, head={"pooling": "auto"})


def _measured(estimator: Estimator, model_dir, stage: str, checkpointing: str, verbalizer: bool = False):
    """The real run's peaks (the storages alive at once, counted as they are made and freed), and per
    phase the issue's measure: the bytes saved for backward that were not alive before the step, plus
    what was (weights, optimizer state, batch): a lower bound of the peak."""
    backbone = load_backbone(str(model_dir), with_lm_head=verbalizer)
    saved: dict[str, int] = {}

    @contextlib.contextmanager
    def probe(phase: str, memory: LiveMemory):
        alive, new = set(memory.live), {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in alive:
                new.setdefault(storage._cdata, storage.nbytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        saved[phase] = memory.current + sum(new.values())

    real = estimator.simulate(stage, "fp32", checkpointing, BATCH, LENGTH, backbone=backbone, probe=probe)
    return real, saved


@pytest.mark.parametrize(
    "family, checkpointing",
    [("bert", "none"), ("bert", "prompted"), ("llama", "none"), ("llama", "prompted"), ("gpt2", "prompted")],
)
def test_estimate_is_within_15_percent_of_the_measured_peak(tmp_path, tiny, family, checkpointing):
    model_dir = tiny[family]
    estimator = Estimator(_config(tmp_path, model_dir), device="cpu")
    for stage in ("search", "retrain"):
        fake = estimator.simulate(stage, "fp32", checkpointing, BATCH, LENGTH)
        real, saved = _measured(estimator, model_dir, stage, checkpointing)
        assert fake.params == real.params and fake.trainable == real.trainable and fake.layers == real.layers
        assert set(fake.phases) == (
            {"weight step", "gate step", "evaluation"} if stage == "search" else {"weight step", "evaluation"}
        )
        for phase, peak in fake.phases.items():
            assert peak == pytest.approx(real.phases[phase], rel=0.15), (stage, phase)  # the target
            assert peak == pytest.approx(real.phases[phase], rel=0.02), (
                stage,
                phase,
            )  # in fact: the same steps, fake or real
            if phase in saved:  # the measure (saved for backward + what was alive) misses every transient
                assert saved[phase] <= real.phases[phase] * 1.001 and saved[phase] <= peak * 1.001
        assert fake.peak > fake.weights_bytes + fake.state_bytes  # the step itself costs something


def test_the_live_storage_count_is_what_the_cpu_allocator_reports(tmp_path, tiny):
    """The counter the estimate and the measurement share, checked against the allocator: torch.profiler's
    memory events (every allocation and free of the CPU allocator) over a plain search step."""
    from torch.profiler import ProfilerActivity, profile

    estimator = Estimator(_config(tmp_path, tiny["bert"]), device="cpu")
    rises: dict[str, int] = {}

    @contextlib.contextmanager
    def probe(phase: str, memory: LiveMemory):
        start = memory.current
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        rise = peak = 0
        for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
            rise += event.self_cpu_memory_usage
            peak = max(peak, rise)
        rises[phase] = start + peak

    real = estimator.simulate(
        "search", "fp32", "none", BATCH, LENGTH, backbone=load_backbone(str(tiny["bert"])), probe=probe
    )
    for phase in ("weight step", "gate step"):
        assert real.phases[phase] == pytest.approx(rises[phase], rel=0.02)


def test_a_verbalizer_head_and_bf16_are_estimated(tmp_path, tiny):
    """head.type clm (the frozen LM head, its logits over the vocabulary) and bf16 (CPU autocast) as measured."""
    model_dir = tiny["llama"]
    config = _config(
        tmp_path,
        model_dir,
        head={"type": "clm", "template": "{text_a} It was {mask}.", "label_words": {"0": "bad", "1": "good"}},
    )
    estimator = Estimator(config, device="cpu")
    weights = {}
    for precision in ("fp32", "bf16"):
        fake = estimator.simulate("search", precision, "prompted", BATCH, LENGTH)
        weights[precision] = fake.weights_bytes
        backbone = load_backbone(
            str(model_dir), with_lm_head=True, dtype=torch.bfloat16 if precision == "bf16" else torch.float32
        )
        real = estimator.simulate("search", precision, "prompted", BATCH, LENGTH, backbone=backbone)
        for phase, peak in fake.phases.items():
            assert peak == pytest.approx(real.phases[phase], rel=0.02), (precision, phase)
    assert weights["bf16"] < 0.6 * weights["fp32"]  # (the backbone in bf16, what trains in fp32)


def test_a_cuda_target_runs_layer_norms_in_fp32_under_bf16(tmp_path, tiny):
    """CUDA's autocast keeps layer norms (and what follows them) in fp32 where CPU's runs them in bf16:
    a BERT's bf16 step costs more for a CUDA target, checkpointed layers recomputed alike."""
    import torch.nn.functional as F  # noqa: N812

    config = _config(tmp_path, tiny["bert"])
    layer_norm = F.layer_norm
    for checkpointing in ("none", "prompted"):
        cpu = Estimator(config, device="cpu").simulate("retrain", "bf16", checkpointing, BATCH, LENGTH)
        cuda = Estimator(config, device="cuda").simulate("retrain", "bf16", checkpointing, BATCH, LENGTH)
        assert cuda.phases["weight step"] > cpu.phases["weight step"], checkpointing
    assert F.layer_norm is layer_norm  # (put back)


def test_the_backbone_is_built_from_config_json_alone(tmp_path, tiny, monkeypatch):
    """A folder with config.json and no weights (nor tokenizer) is enough, and nothing is loaded."""
    import transformers

    folder = tmp_path / "shape-only"
    folder.mkdir()
    (folder / "config.json").write_text((tiny["llama"] / "config.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    real_params = sum(p.numel() for p in load_backbone(str(tiny["llama"])).parameters())
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr("spt.backbone.load_hf_model", refuse)
    result = estimate(_config(tmp_path, folder), stages=["search"], precisions=["fp32"], checkpointing=["none"])
    shaped = estimate(_config(tmp_path, tiny["llama"]), stages=["search"], precisions=["fp32"], checkpointing=["none"])
    assert result.rows[0].peak_bytes == shaped.rows[0].peak_bytes  # the weights never mattered
    assert result.rows[0].params == real_params + result.rows[0].trainable


def test_a_hub_id_is_read_from_the_local_cache(tmp_path, tiny, monkeypatch):
    """A hub id whose config.json is in the Hugging Face cache needs no network and no weights."""
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tiny["llama"] / "config.json").read_text())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _config(tmp_path, tiny["llama"])
    config.model.backbone = "someone/tiny-llama"
    assert Estimator(config, device="cpu").hf_config.num_hidden_layers == 2


def test_the_fake_batch_holds_what_collate_makes(tmp_path, tiny):
    estimator = Estimator(_config(tmp_path, tiny["bert"]), device="cpu")
    split = EncodedSplit([[1] * LENGTH] * 2, None, [0, 1], None, 0)
    made = collate(split, [0, 1], "cpu", 3)
    fake = estimator.batch(2, LENGTH, None)
    assert set(fake) == set(made)
    assert all(fake[k].shape == made[k].shape and fake[k].dtype == made[k].dtype for k in made if k != "has_padding")


def test_checkpointing_lowers_the_estimate_and_quantized_weights_are_smaller(tmp_path, tiny):
    config = _config(tmp_path, tiny["llama"])
    estimator = Estimator(config, device="cpu")
    plain, checkpointed = (estimator.row("search", "fp32", mode, 16, LENGTH) for mode in ("none", "prompted"))
    assert checkpointed.peak_bytes < plain.peak_bytes and checkpointed.weights_bytes == plain.weights_bytes
    bf16, int8, nf4 = (estimator.row("retrain", p, "none", 16, LENGTH) for p in ("bf16", "int8", "nf4"))
    assert nf4.weights_bytes < int8.weights_bytes < bf16.weights_bytes < plain.weights_bytes
    assert bf16.peak_bytes - nf4.peak_bytes < bf16.weights_bytes - nf4.weights_bytes  # (less one dequantized weight)
    assert bf16.trainable < plain.trainable and bf16.layers == [0, 1] and plain.layers == [0, 1]
    rows = estimate(config, stages=["inference", "retrain"], precisions=["fp32"], checkpointing=["none"]).rows
    assert [(r.stage, r.batch) for r in rows] == [
        ("inference", config.search.eval_batch_size),
        ("retrain", config.retrain.batch_size),
    ]  # (in the order asked)


def test_the_largest_batch_is_the_last_that_fits(tmp_path, tiny):
    estimator = Estimator(_config(tmp_path, tiny["llama"]), device="cpu")

    def total(b):
        return estimator.total(estimator.peaks("inference", "fp32", "none", b, LENGTH), "fp32")

    usable = total(37) + (total(38) - total(37)) // 2  # between 37 and 38 examples
    assert estimator.max_batch("inference", "fp32", "none", LENGTH, usable, start=4) == 37
    assert estimator.max_batch("inference", "fp32", "none", LENGTH, total(1) - 1) == 0


@pytest.mark.parametrize("answer", [1, 2, 37, 1000, 123_457])
def test_the_largest_batch_search_is_exact_on_bent_lines(monkeypatch, answer):
    """A peak that grows faster from some batch on (another phase takes over) still gives the exact answer."""
    estimator = Estimator.__new__(Estimator)
    estimator.device = "cpu"
    calls = []

    def peaks(stage, precision, checkpointing, b, length):
        calls.append(b)
        peak = 1000 + 10 * b + (25 * (b - 50) if b > 50 else 0)
        return Peaks(1, 1, 0, 0, {"step": peak}, [0])

    monkeypatch.setattr(estimator, "peaks", peaks, raising=False)
    usable = 1000 + 10 * answer + (25 * (answer - 50) if answer > 50 else 0) + 5
    assert estimator.max_batch("search", "fp32", "none", 16, usable, start=8) == answer
    assert len(set(calls)) < 40


def test_memory_sizes_and_worst_layers():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("24 GiB") == 24 * 2**30
    assert parse_memory("48000MB") == 48 * 10**9
    assert parse_memory("80") == 80 * 10**9
    assert parse_memory("0.5g") == 5 * 10**8
    assert worst_layers(list(range(24)), 3) == [0, 12, 23]
    assert worst_layers([4, 5, 6], 5) == [4, 5, 6]
    assert worst_layers(list(range(30)), 1) == [0]


def test_cli_table_and_json_round_trip(tmp_path, tiny, capsys):
    path = _path(tmp_path, tiny["llama"])
    args = ["estimate", str(path), "--precision", "fp32", "nf4", "--batch", "4", "--length", "16", "--device", "cpu"]
    assert main([*args, "--stages", "retrain", "inference", "--checkpointing", "all", "none", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["memory_bytes"], data["family"], data["layers"], data["device"]) == (None, "llama", 2, "cpu")
    rows = data["rows"]
    assert [(r["stage"], r["precision"], r["checkpointing"]) for r in rows] == [
        ("retrain", "fp32", "none"), ("retrain", "fp32", "prompted"), ("retrain", "nf4", "none"),
        ("retrain", "nf4", "prompted"), ("inference", "fp32", None), ("inference", "nf4", None),
    ]  # fmt: skip
    assert all(r["max_batch"] is None and r["batch"] == 4 and r["length"] == 16 for r in rows)
    assert main([*args, "--stages", "inference", "--memory", "200MB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "largest batch: peak within 90% of the memory" in lines[0]
    assert lines[1].split()[:3] == ["stage", "precision", "checkpointing"] and set(lines[2]) <= {"-", " "}
    for row, line in zip(rows[4:], lines[3:], strict=True):  # the same numbers as the JSON
        cells = line.split()
        assert cells[:3] == ["inference", row["precision"], "-"]
        assert cells[-2] == f"{row['peak_bytes'] / 10**9:.2f}"
        assert int(cells[-1].replace(",", "")) > 4  # the largest batch on 200 MB (x 0.9)


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "model.backbone=nobody/no-such-model-here"], "model.backbone"),
        (["--set", "model.backbone=./no/such/folder"], "model.backbone"),
        (["--memory", "lots"], "--memory"),
        (["--memory=-3GB"], "--memory"),
        (["--length", "100000"], "--length"),
        (
            [
                "--set",
                "head.type=mlm",
                "--set",
                "head.template={text_a} {mask}",
                "--set",
                "head.label_words={0: a, 1: b}",
            ],
            "head.type",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny, capsys, args, field):
    path = _path(tmp_path, tiny["llama"])
    assert main(["estimate", str(path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}"), err


def test_fp4_as_model_quantize_names_it_is_estimated_as_nf4(tmp_path, tiny, capsys):
    """model.quantize takes fp4; its layout (bitsandbytes' Linear4bit) is nf4's, byte for byte."""
    path = _path(tmp_path, tiny["llama"])
    args = ["--stages", "inference", "--batch", "4", "--length", "16", "--device", "cpu", "--json"]
    assert main(["estimate", str(path), "--precision", "nf4", "fp4", *args]) == 0
    nf4, fp4 = json.loads(capsys.readouterr().out)["rows"]
    assert (nf4["precision"], fp4["precision"]) == ("nf4", "fp4")
    assert fp4["peak_bytes"] == nf4["peak_bytes"] and fp4["weights_bytes"] == nf4["weights_bytes"]


@pytest.mark.parametrize(
    "setting, field", [("select.k=50", "select.k"), ("select.budget=10", "select.budget")]
)  # fmt: skip
def test_a_selection_a_run_refuses_is_refused(tmp_path, tiny, capsys, setting, field):
    """K above the candidates, or a budget that pays for no generator: refused as spt run refuses them."""
    path = _path(tmp_path, tiny["llama"])
    k = ["--set", "select.k=null"] if field == "select.budget" else []
    assert main(["estimate", str(path), *k, "--set", setting, "--stages", "retrain", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: "), err


def test_gpt2_gets_no_quantized_rows(tmp_path, tiny, capsys):
    """model.quantize refuses GPT-2 (Conv1D projections): its estimate has no int8/nf4 rows by default,
    and asking for one is refused in one line."""
    path = _path(tmp_path, tiny["gpt2"])
    args = ["estimate", str(path), "--stages", "inference", "--device", "cpu"]
    assert main([*args, "--json"]) == 0
    assert [r["precision"] for r in json.loads(capsys.readouterr().out)["rows"]] == ["fp32", "bf16"]
    assert main([*args, "--precision", "bf16", "nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --precision: nf4 is not offered for gpt2"), err


def test_a_length_too_long_names_where_it_came_from(tmp_path, tiny, capsys):
    """--length too long: the fix is a shorter --length; model.max_length too long (no --length): that field."""
    path = _path(tmp_path, tiny["llama"])
    assert main(["estimate", str(path), "--length", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --length: ") and "lower --length to at most" in err and "max_length" not in err, err
    assert main(["estimate", str(path), "--set", "model.max_length=100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.max_length: ") and "lower model.max_length to at most" in err, err


def test_a_batch_below_one_is_refused(tmp_path, tiny, capsys):
    path = _path(tmp_path, tiny["llama"])
    with pytest.raises(SystemExit) as exc:
        main(["estimate", str(path), "--batch", "0"])
    assert exc.value.code == 2
    assert "--batch: must be a whole number of at least 1" in capsys.readouterr().err
    with pytest.raises(Exception, match="--batch"):
        estimate(load_config(path), batch=0)
