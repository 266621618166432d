"""The experiments (experiments/): what lands in docs/results.md comes from the raw results, and a run's
final model is read back from its checkpoints."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("tabulate")


def _record(methods, command, dense_test=89.25):
    args = {"width": 0.25, "depths": [1, 1, 3, 1], "seed": 0, "finish_split": "half", "finish_epochs": 2, "methods": "x", "json": "y"}
    return {"command": command, "args": args, "device": "cpu (CPU)", "methods": methods,
            "dense": {"params": 1000, "val": 90.0, "test": dense_test, "search": 90.3, "finish": 89.7,
                      "epochs": 6, "time_s": 10.0}}


def test_convnext_merge_puts_both_processes_in_one_section(tmp_path):
    from experiments.fashion_report import write_section

    history = [[0, 1000, 90.3, 90.0, 89.25, 0.0, 0.0, 0.0, True], [1, 50, 89.5, 89.4, 88.9, 0.5, 1e-4, 5.0, True]]
    ours = {"params": 50, "val": 89.6, "test": 88.75, "epochs": 9.5, "time_s": 20.0, "best_cycle": 1,
            "stopped": "", "history": history, "finished": [[1, 50, 89.4, 89.9, 89.6, 88.75, 3.0, True]]}
    first = _record({"squeeze-release": ours,
                     "width-scratch": {"params": 52, "val": 88.0, "test": 87.25, "epochs": 9.5, "time_s": 4.0,
                                       "width": 0.25}}, "python -m experiments.convnext_fashion --methods sr,c")
    second = _record({"imp": {"params": 900, "val": 90.1, "test": 89.5, "epochs": 9, "time_s": 7.0,
                              "rounds": [[1, 500, 90.2, 89.4]]}}, "python -m experiments.convnext_fashion --methods b,a")
    path = tmp_path / "results.md"
    path.write_text("# Results\n\nkept by hand\n")
    write_section([first, second], str(path))
    text = path.read_text()
    assert "kept by hand" in text and text.count("<!-- convnext_fashion.py begins -->") == 1
    assert "--methods sr,c" in text and "--methods b,a" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "20.0x" in rows["Squeeze-Release (ours)"] and "| 0.50 " in rows["Squeeze-Release (ours)"]
    assert "(c) narrower ConvNeXt, from scratch (width x0.250)" in rows
    assert "-0.25" in rows["(a) iterative magnitude pruning + one minimization"]  # above dense: a negative drop
    assert "| chosen" in text  # the finishing table


def test_convnext_merge_refuses_processes_of_different_dense_models(tmp_path):
    from experiments.fashion_report import write_section

    with pytest.raises(SystemExit, match="another dense model"):
        write_section([_record({}, "a"), _record({}, "b", dense_test=88.0)], str(tmp_path / "r.md"))


def test_convnext_tagged_run_writes_its_own_section_beside_the_default_one(tmp_path):
    from experiments.fashion_report import write_section

    path = tmp_path / "results.md"
    write_section([_record({}, "python -m experiments.convnext_fashion --methods sr")], str(path))
    tagged = _record({}, "python -m experiments.convnext_fashion --width 1 --section tiny-gpu")
    tagged["args"].update(section="tiny-gpu", width=1.0, depths=[3, 3, 9, 3])
    write_section([tagged], str(path))
    write_section([tagged], str(path))  # rewriting replaces, never duplicates
    text = path.read_text()
    assert text.count("<!-- convnext_fashion.py begins -->") == 1
    assert text.count("<!-- convnext_fashion.py tiny-gpu begins -->") == 1
    assert "## ConvNeXt on Fashion-MNIST (experiments/convnext_fashion.py, tiny-gpu)" in text


def test_convnext_merge_with_macs_reports_them_and_section_picks_where_it_goes(tmp_path):
    """Runs since --mac-power record MACs per image: the summary shows them and their ratio to dense;
    --section at the merge writes a section of its own whatever the runs were started with."""
    from experiments.convnext_fashion import main

    history = [[0, 1000, 90.3, 90.0, 89.25, 0.0, 0.0, 0.0, True], [1, 50, 89.5, 89.4, 88.9, 0.5, 1e-4, 5.0, True]]
    ours = {"params": 50, "macs": 25_000, "val": 89.6, "test": 88.75, "epochs": 9.5, "time_s": 20.0,
            "best_cycle": 1, "stopped": "", "history": history, "finished": []}
    record = _record({"squeeze-release": ours}, "python -m experiments.convnext_fashion --mac-power 0.5")
    record["dense"]["macs"] = 5_000_000
    raw = tmp_path / "results-sr.json"
    raw.write_text(json.dumps(record))
    path = tmp_path / "results.md"
    path.write_text("<!-- convnext_fashion.py begins -->\nthe reported run\n<!-- convnext_fashion.py ends -->\n")
    main(["--merge", str(raw), "--section", "mac-priced", "--write", str(path)])
    text = path.read_text()
    assert "the reported run" in text and "<!-- convnext_fashion.py mac-priced begins -->" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 25 " in rows["Squeeze-Release (ours)"] and "| 200.0x " in rows["Squeeze-Release (ours)"]
    assert "| 5,000 " in rows["dense"] and "kMACs / image" in text


def test_convnext_unknown_method_is_a_clear_error():
    from experiments.convnext_fashion import main

    with pytest.raises(SystemExit, match=r"unknown \['x'\]; choose from sr, a, b, c, r, dense"):
        main(["--methods", "sr,x"])


def _seed_records():
    records = []
    for seed, (params, test) in enumerate([(40, 88.75), (50, 88.25)]):
        item = _record({"squeeze-release": {"params": params, "val": 89.0, "test": test, "epochs": 9, "time_s": 1.0}},
                       f"--seed {seed}")
        item["args"].update(seed=seed, dense_epochs=6)
        records.append(item)
    return records


def test_convnext_seeds_summary_gives_each_seed_and_the_spread_of_each_method():
    from experiments.fashion_report import seeds_section

    records = _seed_records()
    text = seeds_section(records)
    rows = [line for line in text.splitlines() if line.startswith("| Squeeze-Release (ours)")]
    # fewer: 1000/40 = 25x and 1000/50 = 20x; drops 0.50 and 1.00
    assert rows and "22.5 ± 3.5x" in rows[0] and "0.75 ± 0.35" in rows[0] and "20.0x" in rows[0] and "1.00" in rows[0]
    other = _record({}, "--width 1")
    other["args"].update(width=1.0, dense_epochs=6)
    with pytest.raises(SystemExit, match="different models"):
        seeds_section(records + [other])


def test_convnext_seeds_summary_writes_its_section_and_plot_from_the_raw_files(tmp_path):
    from experiments.convnext_fashion import main

    paths = []
    for record in _seed_records():
        paths.append(tmp_path / f"seed{record['args']['seed']}.json")
        paths[-1].write_text(json.dumps(record))
    results = tmp_path / "results.md"
    results.write_text("# Results\n\nby hand\n")
    main(["--seeds-summary", *map(str, paths), "--write", str(results)])
    text = results.read_text()
    assert text.startswith("# Results\n\nby hand\n")  # what was there is kept
    section = text.split("<!-- convnext_fashion.py seeds begins -->")[1].split("<!-- convnext_fashion.py seeds ends -->")[0]
    assert "22.5 ± 3.5x" in section and str(paths[0]) in section
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "convnext_fashion-seeds.png").stat().st_size > 0
        assert "(convnext_fashion-seeds.png)" in section
    else:
        assert ".png" not in section


def test_convnext_control_c_needs_only_ours_raw_results_and_c_prime_says_where_the_checkpoints_are(tmp_path):
    from experiments.fashion_report import load_ours

    ours = {"params": 40, "val": 89.0, "test": 88.75, "epochs": 19, "time_s": 1.0, "best_cycle": 3}
    record = _record({"squeeze-release": ours}, "--methods sr")
    record["args"]["checkpoints"] = str(tmp_path / "elsewhere")
    path = tmp_path / "results-sr.json"
    path.write_text(json.dumps(record))
    assert load_ours(str(path), architecture=False) == (ours, None)
    with pytest.raises(SystemExit, match="holds none"):
        load_ours(str(path))
    with pytest.raises(SystemExit, match="needs --ours"):
        load_ours(str(tmp_path / "missing.json"))


def _loop_with_checkpoints(folder):
    """A finished Squeeze-Release loop on a tiny MLP, its checkpoints in ``folder``."""
    import torch
    from torch import nn

    import fxmin
    torch.manual_seed(0)
    x, y = torch.randn(200, 12), torch.randint(0, 3, (200,))
    net = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 3))

    def train(model, step):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    result = fxmin.squeeze_release(net, train=train, evaluate=lambda m: 1.0, example_inputs=(x[:8],), cycles=2,
                                   amount=0.5, criterion=fxmin.unit_scaled_magnitude, finish_epochs=1,
                                   checkpoint_dir=str(folder), progress=False)
    return net, result, x


def test_final_module_takes_the_finished_weights_and_falls_back_to_the_cycles_model(tmp_path):
    import os

    import torch

    import fxmin
    from experiments.results import final_module
    _, result, _ = _loop_with_checkpoints(tmp_path)
    params = fxmin.count_parameters(result.module)
    module, weights = final_module(str(tmp_path), result.best_cycle, params)
    assert weights == "finished"
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), result.module.state_dict().values()))
    alone, weights = final_module(fxmin.cycle.finish_checkpoint(str(tmp_path)), result.best_cycle, params)
    assert weights == "finished" and fxmin.count_parameters(alone) == params  # the file brought back from a device
    with pytest.raises(SystemExit, match="chose cycle"):
        final_module(fxmin.cycle.finish_checkpoint(str(tmp_path)), result.best_cycle + 1)
    os.remove(fxmin.cycle.finish_checkpoint(str(tmp_path)))  # a run older than finishing checkpoints
    module, weights = final_module(str(tmp_path), result.best_cycle, params)
    assert weights == "before finishing" and fxmin.count_parameters(module) == params
    with pytest.raises(SystemExit, match="another run"):
        final_module(str(tmp_path), result.best_cycle, params + 1)


def test_convnext_experiment_reinitializes_a_minimized_convnext_without_touching_it():
    """Control (c') of experiments/convnext_fashion.py: the found architecture, parameters drawn afresh."""
    import torch

    import fxmin
    from experiments.convnext_fashion import reinitialize
    from fxmin.zoo import convnext_tiny

    torch.manual_seed(0)
    model = convnext_tiny(num_classes=10, in_channels=1, stem="small", width=0.25, depths=(1, 1, 1, 1),
                          stochastic_depth_prob=0.0).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # a "trained" model: far from the initialization
    masks = fxmin.global_magnitude(model, 0.6)
    module = fxmin.minimize(model, masks, (torch.randn(2, 1, 28, 28),)).module
    before = {name: value.clone() for name, value in module.state_dict().items()}
    fresh = reinitialize(module, seed=1)
    assert all(torch.equal(value, before[name]) for name, value in module.state_dict().items())  # untouched
    assert fxmin.count_parameters(fresh) == fxmin.count_parameters(module)
    assert any(isinstance(sub, fxmin.CompensatedLayerNorm) for sub in fresh.modules())
    fresh_parameters = dict(fresh.named_parameters())
    scales = [value for name, value in fresh_parameters.items() if "layer_scale" in name]
    assert scales and all(torch.all(value == 1e-6) for value in scales)
    weights = torch.cat([value.detach().flatten() for value in fresh_parameters.values() if value.dim() > 1])
    assert 0.015 < float(weights.std()) < 0.025  # ConvNeXt's init (std 0.02), not the trained weights (std > 1)
    for name, buffer in fresh.named_buffers():  # the architecture (removed channels' constants) stays
        assert torch.equal(buffer, before[name])
    assert fresh(torch.randn(2, 1, 28, 28)).shape == (2, 10)
