"""`permerge run`: a recipe reproduces the command line bit for bit, a result's provenance.json re-runs
it, and a bad recipe is refused in one line before any work."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from permerge.cli import main, subcommand_parser
from permerge.errors import PermergeError
from permerge.models import MLP
from permerge.recipe import recipe_argv

MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"in_features": 20, "hidden": [16, 16]}', "--input-shape", "2,20"]
RECIPE_MODEL = "model: permerge.models:MLP\nmodel_kwargs: {in_features: 20, hidden: [16, 16]}\ninput_shape: 2,20\n"


@pytest.fixture
def ckpts(tmp_path):
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        save_file(MLP(in_features=20, hidden=(16, 16)).state_dict(), tmp_path / f"m{seed}.safetensors")
    return tmp_path


def _bytes(path):
    return (path / "model.safetensors").read_bytes()


def test_recipe_reproduces_the_command_line_bit_for_bit(ckpts, tmp_path, capsys, monkeypatch):
    argv = ["merge", *MODEL, "m0.safetensors", "m1.safetensors", "m2.safetensors", "--method", "many", "--seed", "3"]
    monkeypatch.chdir(ckpts)
    assert main(["-q", *argv, "-o", "cli"]) == 0
    # a recipe in another directory: its relative paths start from the recipe's own directory
    (ckpts / "recipes").mkdir()
    recipe = ckpts / "recipes" / "merge.yaml"
    recipe.write_text("# MergeMany of three seeds\ncommand: merge\n" + RECIPE_MODEL +
                      "checkpoints: [../m0.safetensors, ../m1.safetensors, ../m2.safetensors]\n"
                      "method: many\nseed: 3\nout: ../from-recipe\n")  # fmt: skip
    monkeypatch.chdir(tmp_path.parent)
    assert main(["-q", "run", str(recipe)]) == 0
    assert "merged 3 models (many)" in capsys.readouterr().out
    assert _bytes(ckpts / "from-recipe") == _bytes(ckpts / "cli")
    prov = json.loads((ckpts / "from-recipe" / "provenance.json").read_text())
    assert prov["config"]["command"] == "merge" and prov["config"]["seed"] == 3 and prov["cwd"] == str(ckpts / "recipes")
    # JSON recipes, dashes in names, --set overrides and -o (relative to where permerge run is called)
    (ckpts / "r.json").write_text(json.dumps({"command": "merge", "model": "permerge.models:MLP",
                                              "model-kwargs": {"in_features": 20, "hidden": [16, 16]}, "input-shape": "2,20",
                                              "checkpoints": ["m0.safetensors", "m1.safetensors", "m2.safetensors"],
                                              "method": "weight", "out": "unused"}))  # fmt: skip
    assert main(["-q", "run", str(ckpts / "r.json"), "--set", "method=many", "--set", "seed=3", "-o", str(tmp_path / "set")]) == 0
    assert _bytes(tmp_path / "set") == _bytes(ckpts / "cli")
    assert not (ckpts / "unused").exists()


def test_provenance_reruns_the_result_bit_for_bit(ckpts, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ckpts)
    assert main(["-q", "align", *MODEL, "m0.safetensors", "m1.safetensors", "-o", "al", "--max-sweeps", "7"]) == 0
    assert main(["-q", "apply", *MODEL, "al", "m2.safetensors", "-o", "ap"]) == 0
    monkeypatch.chdir(tmp_path.parent)  # elsewhere: the record says where it ran
    for name in ("al", "ap"):
        assert main(["-q", "run", str(ckpts / name / "provenance.json"), "-o", str(tmp_path / f"{name}-again")]) == 0
        assert _bytes(tmp_path / f"{name}-again") == _bytes(ckpts / name)
        again = json.loads((tmp_path / f"{name}-again" / "provenance.json").read_text())
        first = json.loads((ckpts / name / "provenance.json").read_text())
        assert {k: v for k, v in again["config"].items() if k != "out"} == {k: v for k, v in first["config"].items() if k != "out"}
        assert again["inputs"] == first["inputs"]  # the same files, by hash
    # the original output is never replaced by a re-run without -o: it is not empty, and --force is not replayed
    assert main(["run", str(ckpts / "al" / "provenance.json")]) == 2
    assert "is not empty" in capsys.readouterr().err
    # --dry-run shows the command line a record stands for
    assert main(["run", str(ckpts / "al" / "provenance.json"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["runs"] == "align" and plan["cwd"] == str(ckpts) and "--max-sweeps" in plan["argv"]
    assert plan["argv"][-3:] == ["--", "m0.safetensors", "m1.safetensors"]


def _bad_recipes(root):
    good = "command: align\n" + RECIPE_MODEL + "a: m0.safetensors\nb: m1.safetensors\nout: out\n"
    return [
        ("recipe.yaml", "command: align\nmodel: [unclosed\n", "is not valid YAML"),
        ("recipe.json", "{not json", "is not valid JSON"),
        ("recipe.yaml", "- a\n- b\n", "must be a mapping of options"),
        ("recipe.yaml", RECIPE_MODEL, "has no 'command'"),
        ("recipe.yaml", "command: frobnicate\n", "unknown command 'frobnicate'; choose one of inspect, align, merge, apply"),
        ("recipe.yaml", "command: run\nrecipe: x.yaml\n", "unknown command 'run'"),
        ("recipe.yaml", good + "max_sweep: 3\n", "unknown option 'max_sweep' for permerge align; did you mean 'max_sweeps'?"),
        ("recipe.yaml", good + "seed: three\n", "argument --seed: invalid int value: 'three'"),
        ("recipe.yaml", good + "force: 1\n", "option 'force' is a flag: give true or false"),
        ("recipe.yaml", good + "method: [weight, activation]\n", "option 'method' takes one value, got a list of 2"),
        ("recipe.yaml", good.replace("b: m1.safetensors\n", ""), "the following arguments are required: b"),
        ("recipe.yaml", good + "emit_mergekit: ties\n", "argument --emit-mergekit: invalid choice: 'ties'"),
        ("recipe.yaml", good + "verbose: 2\n", "unknown option 'verbose'"),
        ("missing.yaml", None, "cannot read recipe"),
        ("provenance.json", json.dumps({"versions": {}, "config": {"a": 1}}), "records no re-runnable command"),
    ]


def test_bad_recipes_are_refused_in_one_line_before_any_work(ckpts, tmp_path, capsys, monkeypatch):
    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before validating the recipe")

    monkeypatch.setattr(torch.export, "export", no_tracing)
    for name, text, message in _bad_recipes(ckpts):
        path = ckpts / name
        path.unlink(missing_ok=True)
        if text is not None:
            path.write_text(text)
        start = time.process_time()
        assert main(["run", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("permerge run: error: ") and message in err, (text, err)
        assert time.process_time() - start < 1.0
        assert not (ckpts / "out").exists() and not list(ckpts.glob(".out*"))
    assert main(["run", str(ckpts / "recipe.yaml"), "--set", "seed"]) == 2
    assert "write OPTION=VALUE" in capsys.readouterr().err


def test_recipe_schema_is_the_parser():
    """Every option of every runnable command has a recipe spelling, and booleans / lists / mappings
    become the command line the parser reads."""
    parser = subcommand_parser("align")
    argv = recipe_argv({"a": "x", "b": "y", "out": "o", "stream": False, "force": True, "model_kwargs": {"w": 2},
                        "emit_mergekit": True, "max-sweeps": 5, "spec": None}, parser)  # fmt: skip
    assert argv == ["-o", "o", "--no-stream", "--force", "--model-kwargs", '{"w": 2}', "--emit-mergekit", "--max-sweeps", "5",
                    "--", "x", "y"]  # options in the recipe's order, then the positional arguments in the parser's
    args = parser.parse_args(argv)
    assert (args.a, args.b, args.stream, args.force, args.emit_mergekit, args.max_sweeps, args.spec) == ("x", "y", False, True,
                                                                                                       "linear", 5, None)  # fmt: skip
    for command in ("inspect", "align", "merge", "apply", "barrier", "demo"):
        p = subcommand_parser(command)
        dests = {a.dest for a in p._actions if a.dest not in ("help", "verbose", "quiet", "json")}
        with pytest.raises(PermergeError, match="unknown option"):
            recipe_argv({"no_such_option": 1}, p, skip=("verbose", "quiet", "json"))
        assert recipe_argv(dict.fromkeys(dests), p) == []  # every destination is a recipe key (None: the default)
