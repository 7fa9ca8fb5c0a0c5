"""Hugging Face models out of every command that writes one: config, tokenizer files, chat templates
and a model card beside the weights, loadable by `from_pretrained`; and the align → mergekit round
trip with the real mergekit package (an optional extra)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import permerge as pm
from permerge.cli import main

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from hf_zoo import write

    root = tmp_path_factory.mktemp("hfout")
    a, b = write("llama", 0, root / "a"), write("llama", 1, root / "b")
    # what a Hub download carries besides the weights
    (a / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (a / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (a / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (a / "additional_chat_templates").mkdir()
    (a / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    (a / "README.md").write_text("---\nlicense: mit\n---\n# model A\n")
    (a / "tf_model.h5").write_bytes(b"unpermuted")
    return a, b


def _front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_hf_merge_is_a_directory_from_pretrained_loads_with_the_merged_function(pair, tmp_path, capsys):
    from hf_zoo import example

    from permerge.merge.combine import merge_models

    a, b = pair
    out = tmp_path / "merged"
    assert main(["-q", "merge", "--model", str(a), str(a), str(b), "--weights", "0.4,0.6", "-o", str(out)]) == 0
    capsys.readouterr()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "additional_chat_templates", "README.md", "model.safetensors"} <= names and "tf_model.h5" not in names  # fmt: skip
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert (out / "tokenizer_config.json").read_bytes() == (a / "tokenizer_config.json").read_bytes()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ma, mb = (transformers.AutoModelForCausalLM.from_pretrained(p).eval() for p in (a, b))
    x = example("llama")
    want = merge_models([ma, mb], (x,), weights=[0.4, 0.6], example_kwargs={"use_cache": False}).model
    with torch.no_grad():
        got, expected = loaded(x).logits, want(x, use_cache=False).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["report"]["left_out"]["tf_model.h5"].startswith("TensorFlow weights")
    assert "replaced by permerge's" in prov["report"]["left_out"]["README.md"]
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and meta["tags"] == ["permerge", "merge"]
    block = meta["permerge"]
    assert block["version"] == pm.__version__ and block["command"] == "merge" and block["method"] == "weight"
    assert {k: v["sha256"] for k, v in block["inputs"].items()} == {k: v["sha256"] for k, v in prov["inputs"].items()}
    assert block["function_preservation_error"] == prov["report"]["function_preservation_error"]
    assert "A merge of 2 models" in card and "permerge run provenance.json" in card


def test_align_with_model_writes_an_hf_directory_too(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "aligned"
    assert main(["-q", "align", "--model", str(a), str(a), str(b), "-o", str(out)]) == 0
    capsys.readouterr()
    assert (out / "config.json").read_bytes() == (b / "config.json").read_bytes()  # B's own config
    meta = _front_matter((out / "README.md").read_text())
    assert meta["permerge"]["command"] == "align" and set(meta["permerge"]["inputs"]) == {"a", "b"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(b).eval()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, plain(x).logits, atol=1e-5)  # B's function


def test_emit_mergekit_needs_hugging_face_models(pair, tmp_path, capsys):
    a, b = pair
    mlp = ["--model", "mlp"]
    assert main(["align", *mlp, str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), "-o", str(tmp_path / "o"), "--emit-mergekit"]) == 2
    assert "checkpoint A not found" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"")
    (tmp_path / "y.pt").write_bytes(b"")
    assert main(["align", *mlp, str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), "-o", str(tmp_path / "o"), "--emit-mergekit"]) == 2
    assert "--emit-mergekit needs Hugging Face models" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture
def mergekit(monkeypatch):
    pytest.importorskip("mergekit", reason="mergekit is an optional extra (pip install 'permerge[mergekit]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # mergekit's model card asks the Hub about relative names; ours are absolute
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    def run(recipe, out):
        config = MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text()))
        run_merge(config, str(out), options=MergeOptions(copy_tokenizer=False, quiet=True))
        return transformers.AutoModelForCausalLM.from_pretrained(out).eval()

    return run


def test_align_then_mergekit_equals_permerge_merge(pair, tmp_path, capsys, mergekit):
    a, b = pair
    aligned, merged = tmp_path / "b-aligned", tmp_path / "merged"
    assert main(["-q", "align", str(a), str(b), "-o", str(aligned), "--emit-mergekit"]) == 0
    assert main(["-q", "merge", "--model", str(a), str(a), str(b), "-o", str(merged)]) == 0
    capsys.readouterr()
    recipe = yaml.safe_load((aligned / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "linear" and [m["model"] for m in recipe["models"]] == [str(a.resolve()), str(aligned.resolve())]
    moved = tmp_path / "moved"  # the recipe uses absolute paths: it runs from anywhere
    shutil.copytree(aligned, moved)
    got = mergekit(moved / "mergekit.yaml", tmp_path / "mk").state_dict()
    want = transformers.AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    # the naive merge (B not aligned) is a different model: aligning is what mergekit got from permerge
    naive = tmp_path / "naive"
    assert main(["-q", "merge", "--model", str(a), str(a), str(b), "--method", "average", "-o", str(naive)]) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(naive).state_dict()
    assert max(float((plain[k] - got[k]).abs().max()) for k in got) > 0.05


def test_emit_mergekit_slerp_runs_in_mergekit(pair, tmp_path, capsys, mergekit):
    a, b = pair
    aligned = tmp_path / "b-aligned"
    assert main(["-q", "align", "--model", str(a), str(a), str(b), "-o", str(aligned), "--emit-mergekit", "slerp"]) == 0
    capsys.readouterr()
    recipe = yaml.safe_load((aligned / "mergekit.yaml").read_text())
    assert recipe["merge_method"] == "slerp" and recipe["base_model"] == str(a.resolve()) and recipe["parameters"] == {"t": 0.5}
    model = mergekit(aligned / "mergekit.yaml", tmp_path / "mk")
    ends = [transformers.AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, aligned)]
    w = "model.layers.0.mlp.down_proj.weight"
    got = model.state_dict()[w]
    assert torch.isfinite(got).all() and not torch.allclose(got, ends[0][w]) and not torch.allclose(got, ends[1][w])


LM_DATA = """
import torch


def batches():
    g = torch.Generator().manual_seed(0)
    return [(x, x) for x in torch.randint(0, 64, (2, 3, 12), generator=g)]
"""


def test_merge_barrier_goes_into_curves_report_and_card(pair, tmp_path, monkeypatch, capsys):
    a, b = pair
    (tmp_path / "pm_merge_lm.py").write_text(LM_DATA)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "merged"
    base = ["-q", "merge", "--model", str(a), str(a), str(b)]
    options = ["--barrier-data", "pm_merge_lm:batches", "--alphas", "3", "-o", str(out)]
    assert main([*base, str(a), *options]) == 2  # three models: no line between two endpoints
    assert "merge exactly two" in capsys.readouterr().err and not out.exists()
    assert main([*base, *options]) == 0
    capsys.readouterr()
    curves = json.loads((out / "curves.json").read_text())
    assert list(curves) == ["aligned"] and curves["aligned"]["higher_is_better"]["perplexity"] is False
    ppl = curves["aligned"]["values"]["test"]["perplexity"]
    assert curves["aligned"]["summary"]["test"]["perplexity"]["barrier"]["mean"] == pytest.approx(max(ppl) - (ppl[0] + ppl[-1]) / 2)
    meta = _front_matter((out / "README.md").read_text())
    want = {m: v["barrier"] for m, v in curves["aligned"]["summary"]["test"].items()}
    assert meta["permerge"]["barrier"] == {"aligned": {"test": want}}
    assert "<svg" in (out / "report.html").read_text()  # the report draws the curve
