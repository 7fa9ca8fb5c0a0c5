"""`permerge inspect`, run in-process: stdout, exit codes, and the saved spec."""

from __future__ import annotations

import json

import pytest

from permerge.cli import main
from permerge.spec import PermutationSpec


def test_inspect_example_prints_groups(capsys):
    assert main(["inspect", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert "12 groups, permutable fraction 1.000" in out
    assert "stem.0.weight:0" in out and "[boundary] model output" in out
    assert "symmetry classes: 12 permutation" in out  # BatchNorm: permutations only


def test_inspect_shows_each_groups_symmetry_class(capsys):
    assert main(["inspect", "mlp"]) == 0
    out = capsys.readouterr().out
    assert "symmetry classes: 3 scaled_permutation" in out and out.count("scaled_permutation") == 4


def test_inspect_json_and_save_spec(tmp_path, capsys):
    target = tmp_path / "spec.json"
    assert main(["inspect", "mlp", "--json", "--save-spec", str(target)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["permutable_fraction"] == 1.0 and len(data["groups"]) == 3
    spec = PermutationSpec.from_json(target.read_text())
    assert [g.name for g in spec.groups] == [g["name"] for g in data["groups"]]


def test_inspect_factory_with_input_shape(capsys):
    args = ["inspect", "permerge.models:VGG", "--model-kwargs", '{"widths": [4, 4, 8, 8]}', "--input-shape", "1,1,28,28"]
    assert main(args) == 0
    assert "5 groups" in capsys.readouterr().out


def test_inspect_hf_config_dir(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # stream + per layer: KV heads, query heads within a KV group, V/O head dim, MLP units
    assert "LlamaForCausalLM" in out and "9 groups" in out and "[hidden]" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "nope"], "cannot resolve model 'nope'"),
        (["inspect", "permerge.models:Nope", "--input-shape", "1,2"], "cannot import 'permerge.models:Nope'"),
        (["inspect", "permerge.models:MLP"], "no example input for permerge.models: pass --input-shape"),
        (["inspect", "mlp", "--model-kwargs", "{"], "--model-kwargs is not valid JSON"),
        (["inspect", "permerge.models:MLP", "--input-shape", "2,5"], "forward failed on the example input"),
    ],
)
def test_inspect_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_readme_test_command_is_what_ci_runs():
    from pathlib import Path

    root = Path(__file__).parents[2]
    readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
    command = "pip install torch==2.13.0 && pip install --no-deps 'timm>=1.0.31,<1.1' && pip install -e '.[test]' && python -m pytest -q -m \"not slow\""
    assert command in readme and command in ci


def test_global_flags_also_after_the_subcommand():
    from permerge.cli import build_parser

    args = build_parser().parse_args(["inspect", "mlp", "-q"])
    assert args.quiet is True and args.verbose == 0
    args = build_parser().parse_args(["-vv", "inspect", "mlp"])
    assert args.verbose == 2 and args.quiet is False
