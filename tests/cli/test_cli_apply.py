"""`permerge apply`: a saved permutation on B itself (= the alignment, bit for bit), on a fine-tuned
sibling of B, and on LoRA adapters trained on B (the adapted function is kept), plus the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import permerge as pm
from permerge.cli import main
from permerge.io.read import load_state_dict
from permerge.io.write import save_permutation
from permerge.models import MLP

MODEL = ["--model", "permerge.models:MLP", "--model-kwargs", '{"in_features": 20, "hidden": [16, 16]}', "--input-shape", "2,20"]


def _mlp(seed):
    torch.manual_seed(seed)
    return MLP(in_features=20, hidden=(16, 16)).eval()


@pytest.fixture
def mlp_pair(tmp_path):
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"m{seed}.safetensors")
        save_file(_mlp(seed).state_dict(), paths[-1])
    return paths


def test_apply_to_b_is_the_alignment_bit_for_bit_and_to_a_sibling_keeps_its_function(mlp_pair, tmp_path, capsys):
    a, b = mlp_pair
    assert main(["-q", "align", *MODEL, str(a), str(b), "-o", str(tmp_path / "al")]) == 0
    assert main(["-q", "apply", *MODEL, str(tmp_path / "al"), str(b), "-o", str(tmp_path / "ap")]) == 0
    assert "applied the saved permutation (2/2 groups moved)" in capsys.readouterr().out
    assert (tmp_path / "ap" / "model.safetensors").read_bytes() == (tmp_path / "al" / "model.safetensors").read_bytes()
    perms = [load_file(tmp_path / d / "permutation.safetensors") for d in ("al", "ap")]
    assert perms[0].keys() == perms[1].keys() and all(torch.equal(perms[0][k], perms[1][k]) for k in perms[0])
    # a fine-tuned sibling of B: same layout, other weights
    sibling = _mlp(1)
    with torch.no_grad():
        for p in sibling.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_file(sibling.state_dict(), tmp_path / "sib.safetensors")
    assert main(["-q", "apply", *MODEL, str(tmp_path / "al" / "permutation.safetensors"), str(tmp_path / "sib.safetensors"),
                 "-o", str(tmp_path / "sib-al")]) == 0  # fmt: skip
    spec = pm.PermutationSpec.from_json((tmp_path / "al" / "spec.json").read_text())
    perm = load_state_dict(tmp_path / "al" / "permutation.safetensors")
    got = load_file(tmp_path / "sib-al" / "model.safetensors")
    want = pm.apply_permutation(spec, perm, sibling.state_dict())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    moved = _mlp(0)
    moved.load_state_dict(got)
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert torch.allclose(moved(x), sibling(x), atol=1e-5)
    prov = json.loads((tmp_path / "sib-al" / "provenance.json").read_text())
    assert set(prov["inputs"]) == {"permutation", "spec", "checkpoint"} and prov["report"]["function_preservation_error"] < 1e-5


def test_apply_refusals_are_one_line_and_write_nothing(mlp_pair, tmp_path, capsys):
    a, b = mlp_pair
    assert main(["-q", "align", *MODEL, str(a), str(b), "-o", str(tmp_path / "al")]) == 0
    wide = tmp_path / "wide.safetensors"
    save_file(MLP(in_features=20, hidden=(24, 16)).state_dict(), wide)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 2}')
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    cases = [
        (["apply", *MODEL, str(empty), str(b), "-o", out], "has no permutation.safetensors"),
        (["apply", *MODEL, str(tmp_path / "al"), str(tmp_path / "gone.pt"), "-o", out], "checkpoint not found"),
        (["apply", *MODEL, str(tmp_path / "al"), str(wide), "-o", out], "wrong shape"),
        (["apply", str(tmp_path / "al"), str(b), "-o", out], "is not a Hugging Face model directory (no config.json): pass --model"),
        (["apply", *MODEL, str(tmp_path / "al"), str(adapter), "-o", out], "is a LoRA adapter: pass --base"),
        (["apply", *MODEL, str(tmp_path / "al"), str(b), "--base", str(a), "-o", out], "--base is for LoRA adapters"),
        (["apply", *MODEL, str(tmp_path / "al"), str(b), "--out-dtype", "bfloat16", "-o", out], "applies to Hugging Face directories"),
        (["apply", *MODEL, str(tmp_path / "al" / "model.safetensors"), str(b), "-o", out], "is not a 1-D integer vector"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), argv


# -- LoRA adapters --------------------------------------------------------------------------------


def _hand_lora(tmp_path, seed=0):
    """A LoRA adapter on the MLP's two hidden layers, written as PEFT writes it (no peft needed)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in {"net.1": (16, 20), "net.3": (16, 16)}.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, in_f, generator=g)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, 2, generator=g)
    path = tmp_path / "hand-lora"
    path.mkdir()
    save_file(tensors, path / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": ["net.1", "net.3"], "fan_in_fan_out": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path, tensors


def _adapted(model_sd, lora):
    """Base + adapter merged by hand: W + (alpha / r) · B @ A."""
    out = dict(model_sd)
    for name in ("net.1", "net.3"):
        a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
        out[f"{name}.weight"] = out[f"{name}.weight"] + 1.5 * b @ a
    return out


def test_hand_written_lora_adapter_follows_its_base(mlp_pair, tmp_path, capsys):
    a, b = mlp_pair
    adapter, lora = _hand_lora(tmp_path)
    assert main(["-q", "align", *MODEL, str(a), str(b), "-o", str(tmp_path / "al")]) == 0
    assert main(["apply", *MODEL, str(tmp_path / "al"), str(adapter), "--base", str(b), "-o", str(tmp_path / "lo")]) == 0
    assert "LoRA adapter: base + adapter checked" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "lo").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "provenance.json", "report.html"]
    permuted = load_file(tmp_path / "lo" / "adapter_model.safetensors")
    assert set(permuted) == set(lora) and all(permuted[k].shape == lora[k].shape for k in lora)
    assert not all(torch.equal(permuted[k], lora[k]) for k in lora)  # it moved
    x = torch.randn(8, 20)
    before, after = _mlp(0), _mlp(0)
    before.load_state_dict(_adapted(load_file(b), lora))
    after.load_state_dict(_adapted(load_file(tmp_path / "al" / "model.safetensors"), permuted))
    with torch.no_grad():
        assert torch.allclose(after(x), before(x), atol=1e-5)  # aligned B + permuted adapter = B + adapter
    prov = json.loads((tmp_path / "lo" / "provenance.json").read_text())
    assert prov["report"]["adapter_check"]["relative_error"] < 1e-6 and set(prov["inputs"]) >= {"adapter", "base"}


def test_a_wrongly_permuted_adapter_is_caught(mlp_pair, tmp_path):
    from permerge.io.read import MemorySource
    from permerge.lora import AdaptedSource, adapted_error, permute_adapter, read_adapter

    _, b = mlp_pair
    adapter = read_adapter(_hand_lora(tmp_path)[0])
    sd = load_file(b)
    spec = pm.trace(_mlp(1), torch.randn(2, 20))
    perm = pm.random_permutation(spec, seed=1)
    right = permute_adapter(spec, perm, adapter, {k: v.shape for k, v in sd.items()})
    source = AdaptedSource(MemorySource(sd, name="b"), adapter)
    assert adapted_error(source, spec, perm, right) < 1e-6
    wrong = dict(right)
    key = "base_model.model.net.3.lora_A.weight"
    wrong[key] = adapter.tensors[key]  # lora_A left in the old input order
    assert adapted_error(source, spec, perm, wrong) > 0.1


LORA_CASES = {
    "llama: every linear, embeddings, lm_head": ("llama", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                               "up_proj", "down_proj", "embed_tokens", "lm_head"]}),
    "gpt2: Conv1D (fan_in_fan_out), modules_to_save": ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"],
                                                                "fan_in_fan_out": True, "modules_to_save": ["ln_f"]}),
    "llama: DoRA, rsLoRA, alpha_pattern": ("llama", {"target_modules": ["q_proj", "up_proj", "down_proj"], "use_dora": True,
                                                     "use_rslora": True, "alpha_pattern": {"down_proj": 3}}),
    "tied llama: LoRA biases on bias-free layers": ("llama_tied", {"target_modules": ["v_proj", "o_proj"], "lora_bias": True}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_peft_lora_adapter_permuted_with_b_computes_the_same_adapted_function(tmp_path, capsys, case):
    peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'permerge[peft]')")
    from hf_zoo import example, spec_of, write

    transformers = pytest.importorskip("transformers")
    kind, options = LORA_CASES[case]
    b_dir = write(kind, 1, tmp_path / "b")
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(b_dir).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)).eval()
    model.save_pretrained(tmp_path / "lora")
    x = example("gpt2" if kind == "gpt2" else "llama")
    with torch.no_grad():
        want = model(x).logits
    # a saved alignment that moves every group (a real one may leave some in place)
    spec = spec_of(kind, str(b_dir))
    (tmp_path / "al").mkdir()
    (tmp_path / "al" / "spec.json").write_text(spec.to_json())
    save_permutation(pm.random_permutation(spec, seed=3), tmp_path / "al" / "permutation.safetensors")
    assert main(["-q", "apply", str(tmp_path / "al"), str(b_dir), "-o", str(tmp_path / "b-al")]) == 0
    assert main(["-q", "apply", str(tmp_path / "al"), str(tmp_path / "lora"), "--base", str(b_dir), "-o", str(tmp_path / "lora-al")]) == 0
    capsys.readouterr()
    aligned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b-al").eval()
    with torch.no_grad():
        plain = aligned(x).logits
        got = peft.PeftModel.from_pretrained(aligned, tmp_path / "lora-al").eval()(x).logits  # wraps `aligned` in place
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-5 * scale  # aligned B + permuted adapter computes B + adapter
    assert (plain - want).abs().max() > 1e-3 * scale  # and the adapter matters
    card = (tmp_path / "lora-al" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")


def test_adapter_of_another_architecture_is_refused(tmp_path, capsys):
    peft = pytest.importorskip("peft", reason="peft is an optional extra (pip install 'permerge[peft]')")
    from hf_zoo import build, spec_of, write

    b_dir = write("llama", 1, tmp_path / "b")
    other = peft.get_peft_model(build("gpt2", 0), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    other.save_pretrained(tmp_path / "gpt2-lora")
    spec = spec_of("llama", str(b_dir))
    (tmp_path / "al").mkdir()
    (tmp_path / "al" / "spec.json").write_text(spec.to_json())
    save_permutation(pm.random_permutation(spec, seed=3), tmp_path / "al" / "permutation.safetensors")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    assert main(["apply", str(tmp_path / "al"), str(tmp_path / "gpt2-lora"), "--base", str(b_dir), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "which the base checkpoint does not have; is the adapter trained on this base model?" in err
    assert not (tmp_path / "out").exists()
