"""Hostile model folders: each case copies the micro model (or a PTQ fixture), breaks one thing, and runs
`qshard train` on it the way a user would.

Every refusal is an experiment with three numbers: exit code 2, a message naming the file (and the key
or tensor), and 0 files changed in the model folder, the data file and the output folder (which is
never created). The rules under test are in qshard/model/folder.py and qshard/model/load.py: nothing
from the folder is executed, nothing outside it is read, every file is checked and the checkpoint is
compared with config.json before any weight is read.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from qshard.errors import QShardError
from qshard.model import load
from qshard.model.load import QuantSpec, load_tokenizer, open_base
from tests.helpers import recipe_dict, write_rows
from tests.hostile import assert_refused, changed, run_cli, snapshot

PTQ = Path(__file__).parent / "fixtures" / "ptq"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DELETE = object()
# code a hostile folder ships: if qshard (or transformers for it) ever imported it, this file would appear
PAYLOAD = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


# -- ways to break a folder (each returns a function of the folder) -----------------------------------

def config(**changes):
    def edit(m: Path) -> None:
        data = json.loads((m / "config.json").read_text())
        data.update(changes)
        (m / "config.json").write_text(json.dumps({k: v for k, v in data.items() if v is not DELETE}))
    return edit


def tokenizer_config(**changes):
    def edit(m: Path) -> None:
        data = json.loads((m / "tokenizer_config.json").read_text())
        data.update(changes)
        (m / "tokenizer_config.json").write_text(json.dumps(data))
    return edit


def both(*edits):
    return lambda m: [edit(m) for edit in edits]


def write(name: str, content: str | bytes):
    def edit(m: Path) -> None:
        (m / name).unlink(missing_ok=True)
        (m / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def replace_by_folder(name: str):
    def edit(m: Path) -> None:
        (m / name).unlink()
        (m / name).mkdir()
    return edit


def replace_by_pipe(name: str):
    def edit(m: Path) -> None:
        (m / name).unlink()
        os.mkfifo(m / name)
    return edit


def link_outside(name: str):
    """`name` becomes a symlink to a valid copy of itself outside the folder."""
    def edit(m: Path) -> None:
        outside = m.parent / f"elsewhere-{name}"
        shutil.move(m / name, outside)
        (m / name).symlink_to(outside)
    return edit


def dangling_link(name: str):
    def edit(m: Path) -> None:
        (m / name).unlink()
        (m / name).symlink_to(m / "no-such-file")
    return edit


def link_loop(name: str):
    def edit(m: Path) -> None:
        (m / name).unlink()
        (m / name).symlink_to(m / "loop.bin")
        (m / "loop.bin").symlink_to(m / name)
    return edit


def _split(m: Path) -> tuple[bytes, dict, bytes]:
    raw = (m / WEIGHTS).read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return raw[:8], json.loads(raw[8:8 + length]), raw[8 + length:]


def header(edit_header, length: int | None = None, raw_header: bytes | None = None):
    """Rewrite model.safetensors' header (the data bytes stay as they are)."""
    def edit(m: Path) -> None:
        _, head, data = _split(m)
        edit_header(head)
        raw = raw_header if raw_header is not None else json.dumps(head).encode()
        (m / WEIGHTS).write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return edit


def entry(key: str, **changes):
    def edit_header(head: dict) -> None:
        head[key] = {k: v for k, v in {**head[key], **changes}.items() if v is not DELETE}
    return header(edit_header)


def weights(change):
    """Rewrite model.safetensors with `change(tensors)` applied."""
    def edit(m: Path) -> None:
        tensors = load_file(str(m / WEIGHTS))
        change(tensors)
        save_file(tensors, str(m / WEIGHTS), metadata={"format": "pt"})
    return edit


def sharded(change_index=None, change_second=None):
    """model.safetensors split into two shards with an index; then the index (a dict) or the second
    shard's tensors changed."""
    def edit(m: Path) -> None:
        tensors = load_file(str(m / WEIGHTS))
        (m / WEIGHTS).unlink()
        keys = sorted(tensors)
        parts = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
                 "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        for i, (name, names) in enumerate(parts.items()):
            part = {k: tensors[k] for k in names}
            if i == 1 and change_second:
                change_second(part, tensors)
            save_file(part, str(m / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: name for name, names in parts.items() for k in names}}
        if change_index:
            change_index(index, m)
        (m / INDEX).write_text(json.dumps(index))
    return edit


def index_places(key: str, name: str, make=None):
    def change(index: dict, m: Path) -> None:
        index["weight_map"][key] = name
        if make:
            make(m)
    return sharded(change)


def _copy_first_shard_to(rel: str):
    def make(m: Path) -> None:
        target = (m / rel) if not rel.startswith("/") else Path(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(m / "model-00001-of-00002.safetensors", target)
    return make


def ship_code(auto_map: dict, *, tokenizer: bool = False):
    """A folder whose auto_map points at Python files that would leave a marker if run."""
    def edit(m: Path) -> None:
        marker = m.parent / "code-ran"
        for module in {v.split(".")[0] for v in _names(auto_map)}:
            (m / f"{module}.py").write_text(PAYLOAD.format(marker=str(marker)))
        (tokenizer_config if tokenizer else config)(auto_map=auto_map)(m)
    return edit


def _names(auto_map: dict) -> list[str]:
    return [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]


def _shift_tokenizer_ids(m: Path, by: int) -> None:
    """A tokenizer of another model: its ids lie beyond this model's embedding."""
    tokenizer = json.loads((m / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {token: i + by for token, i in tokenizer["model"]["vocab"].items()}
    for added in tokenizer["added_tokens"]:
        added["id"] += by
    (m / "tokenizer.json").write_text(json.dumps(tokenizer))


def _linked_templates(m: Path) -> None:
    """transformers reads additional_chat_templates/*.jinja: here the folder is a link to elsewhere."""
    elsewhere = m.parent / "templates"
    elsewhere.mkdir()
    (elsewhere / "evil.jinja").write_text("{{ messages }}")
    (m / "additional_chat_templates").symlink_to(elsewhere, target_is_directory=True)


KEY = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] float in the micro model

# (case id, how the folder is broken, fragments the message must contain)
CASES = [
    # rule 1: nothing from the folder runs
    ("auto_map_model", ship_code({"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}),
     ["config.json", "auto_map", "never runs"]),
    ("auto_map_config", ship_code({"AutoConfig": "configuration_evil.EvilConfig"}),
     ["config.json", "auto_map"]),
    ("auto_map_tokenizer", ship_code({"AutoTokenizer": ["tokenization_evil.Evil", None]}, tokenizer=True),
     ["tokenizer_config.json", "auto_map", "never runs"]),
    ("unknown_model_type", config(model_type="evil-arch"), ["config.json", "model_type", "evil-arch"]),
    ("no_model_type", config(model_type=DELETE), ["config.json", "model_type"]),
    ("model_type_not_string", config(model_type=5), ["config.json", "model_type"]),
    ("model_type_empty", config(model_type=""), ["config.json", "model_type"]),
    # rule 3: config.json malformed
    ("config_not_json", write("config.json", "{nope"), ["config.json", "not valid JSON"]),
    ("config_a_list", write("config.json", "[1, 2]"), ["config.json", "not an object"]),
    ("config_empty", write("config.json", ""), ["config.json", "not valid JSON"]),
    ("config_binary", write("config.json", b"\xff\xfe\x00garbage"), ["config.json", "not valid JSON"]),
    ("config_nested_bomb", write("config.json", "[" * 200_000), ["config.json", "not valid JSON"]),
    ("config_a_folder", replace_by_folder("config.json"), ["config.json", "folder"]),
    ("config_a_pipe", replace_by_pipe("config.json"), ["config.json", "pipe"]),
    ("config_links_outside", link_outside("config.json"), ["config.json", "outside the model folder"]),
    ("hidden_size_text", config(hidden_size="big"), ["config.json", "hidden_size"]),
    ("hidden_size_negative", config(hidden_size=-4), ["config.json", "hidden_size", "-4"]),
    ("hidden_size_zero", config(hidden_size=0), ["config.json", "hidden_size"]),
    ("hidden_size_nan", write("config.json", '{"model_type": "llama", "hidden_size": NaN}'),
     ["config.json", "hidden_size"]),
    ("layers_absurd", config(num_hidden_layers=10**12), ["config.json", "num_hidden_layers"]),
    ("layers_zero", config(num_hidden_layers=0), ["config.json", "num_hidden_layers"]),
    ("vocab_float", config(vocab_size=1.5), ["config.json", "vocab_size"]),
    ("vocab_bool", config(vocab_size=True), ["config.json", "vocab_size"]),
    ("heads_zero", config(num_attention_heads=0), ["config.json", "num_attention_heads"]),
    ("intermediate_null", config(intermediate_size=None), ["config.json", "intermediate_size"]),
    ("positions_negative", config(max_position_embeddings=-1), ["config.json", "max_position_embeddings"]),
    ("activation_unknown", config(hidden_act="evil_act"), ["config.json", "evil_act"]),
    ("not_a_causal_lm", config(model_type="vit"), ["config.json", "model_type", "not a causal language model"]),
    ("quantization_config_list", config(quantization_config=[1]), ["config.json", "quantization_config"]),
    ("quantization_bits_text", config(quantization_config={"quant_method": "gptq", "bits": "four"}),
     ["config.json", "quantization_config"]),
    # rule 2: files only inside the folder; the index names plain file names
    ("index_parent", index_places(KEY, "../stolen.safetensors", _copy_first_shard_to("../stolen.safetensors")),
     [INDEX, KEY, "../stolen.safetensors"]),
    ("index_absolute", index_places(KEY, "/etc/passwd"), [INDEX, KEY, "/etc/passwd"]),
    ("index_subfolder", index_places(KEY, "sub/model-00001-of-00002.safetensors",
                                     _copy_first_shard_to("sub/model-00001-of-00002.safetensors")), [INDEX, KEY]),
    ("index_backslash", index_places(KEY, "..\\stolen.safetensors"), [INDEX, KEY]),
    ("index_missing_file", index_places(KEY, "model-00009-of-00009.safetensors"),
     [INDEX, KEY, "model-00009-of-00009.safetensors", "not in the model folder"]),
    ("index_wrong_file", index_places("model.norm.weight", "model-00001-of-00002.safetensors"),
     [INDEX, "model.norm.weight", "has no tensor"]),
    ("index_name_not_string", index_places(KEY, 7), [INDEX, KEY]),
    ("index_not_json", both(sharded(), write(INDEX, "{")), [INDEX, "not valid JSON"]),
    ("index_no_weight_map", both(sharded(), write(INDEX, '{"metadata": {}}')), [INDEX, "weight_map"]),
    ("index_weight_map_list", both(sharded(), write(INDEX, '{"weight_map": ["a"]}')), [INDEX, "weight_map"]),
    ("index_weight_map_empty", both(sharded(), write(INDEX, '{"weight_map": {}}')), [INDEX, "weight_map"]),
    ("index_a_pipe", both(sharded(), replace_by_pipe(INDEX)), [INDEX, "pipe"]),
    ("tensor_in_two_shards", sharded(change_second=lambda part, all_: part.update({KEY: all_[KEY]})),
     [KEY, "both"]),
    ("weights_link_outside", link_outside(WEIGHTS), [WEIGHTS, "outside the model folder"]),
    ("weights_dangling_link", dangling_link(WEIGHTS), [WEIGHTS, "cannot be read"]),
    ("weights_link_loop", link_loop(WEIGHTS), [WEIGHTS, "loop"]),
    ("weights_a_folder", replace_by_folder(WEIGHTS), [WEIGHTS, "folder"]),
    ("weights_a_pipe", replace_by_pipe(WEIGHTS), [WEIGHTS, "pipe"]),
    # rule 3: safetensors headers
    ("weights_empty", write(WEIGHTS, b""), [WEIGHTS, "not a safetensors file"]),
    ("weights_five_bytes", write(WEIGHTS, b"abcde"), [WEIGHTS, "not a safetensors file"]),
    ("header_longer_than_file", header(lambda h: None, length=10**7), [WEIGHTS, "not a safetensors file"]),
    ("header_absurd_length", header(lambda h: None, length=2**62), [WEIGHTS, "not a safetensors file"]),
    ("header_not_json", header(lambda h: None, raw_header=b"{not json"), [WEIGHTS, "not JSON"]),
    ("header_a_list", header(lambda h: None, raw_header=b"[1, 2, 3]"), [WEIGHTS, "not a JSON object"]),
    ("entry_not_object", header(lambda h: h.update({KEY: 5})), [WEIGHTS, KEY, "malformed"]),
    ("entry_no_dtype", entry(KEY, dtype=DELETE), [WEIGHTS, KEY, "malformed"]),
    ("entry_no_shape", entry(KEY, shape=DELETE), [WEIGHTS, KEY, "malformed"]),
    ("entry_no_offsets", entry(KEY, data_offsets=DELETE), [WEIGHTS, KEY, "malformed"]),
    ("shape_negative", entry(KEY, shape=[-64, -64]), [WEIGHTS, KEY, "malformed"]),
    ("shape_text", entry(KEY, shape=["64", 64]), [WEIGHTS, KEY, "malformed"]),
    ("offsets_negative", entry(KEY, data_offsets=[-16384, 0]), [WEIGHTS, KEY, "malformed"]),
    ("offsets_reversed", header(lambda h: h[KEY].update(data_offsets=h[KEY]["data_offsets"][::-1])),
     [WEIGHTS, KEY, "before its beginning"]),
    ("offsets_past_the_end", entry(KEY, data_offsets=[10**9, 10**9 + 16384]), [WEIGHTS, KEY, "truncated"]),
    ("offsets_disagree_with_shape", entry(KEY, shape=[64, 32]), [WEIGHTS, KEY, "data_offsets span"]),
    ("dtype_unknown", entry(KEY, dtype="F8_E4M3"), [WEIGHTS, KEY, "F8_E4M3"]),
    ("file_truncated", lambda m: (m / WEIGHTS).write_bytes((m / WEIGHTS).read_bytes()[:-100]),
     [WEIGHTS, "truncated"]),
    # rule 4: the checkpoint disagrees with config.json
    ("vocab_mismatch", config(vocab_size=600), [WEIGHTS, "model.embed_tokens.weight", "[512, 64]", "[600, 64]",
                                                "vocab_size"]),
    ("intermediate_mismatch", config(intermediate_size=96), [WEIGHTS, "mlp", "[128, 64]", "intermediate_size"]),
    ("hidden_mismatch", config(hidden_size=32, head_dim=8), [WEIGHTS, "hidden_size"]),
    ("kv_heads_mismatch", config(num_key_value_heads=4), [WEIGHTS, "k_proj", "num_key_value_heads"]),
    ("heads_mismatch", config(num_attention_heads=2), [WEIGHTS, "q_proj", "num_attention_heads"]),
    ("more_layers_than_weights", config(num_hidden_layers=3), ["lacks", "model.layers.2."]),
    ("tensor_missing", weights(lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
     ["lacks 1 tensor", "model.layers.1.mlp.down_proj.weight"]),
    ("head_missing_untied", weights(lambda t: t.pop("lm_head.weight")), ["lacks 1 tensor", "lm_head.weight"]),
    ("tensor_transposed", weights(lambda t: t.update({KEY.replace("q_proj", "k_proj"):
                                                      t[KEY.replace("q_proj", "k_proj")].T.contiguous()})),
     [WEIGHTS, "k_proj", "[64, 32]", "[32, 64]"]),
    ("norm_wrong_shape", weights(lambda t: t.update({"model.norm.weight": torch.ones(65)})),
     [WEIGHTS, "model.norm.weight", "[65]", "[64]"]),
    ("embedding_stored_as_int", weights(lambda t: t.update({"model.embed_tokens.weight":
                                                            t["model.embed_tokens.weight"].to(torch.int32)})),
     [WEIGHTS, "model.embed_tokens.weight", "int32"]),
    ("buffer_wrong_shape", weights(lambda t: t.update({"model.rotary_emb.inv_freq": torch.ones(3)})),
     [WEIGHTS, "model.rotary_emb.inv_freq", "[3]"]),
    # rule 5: tokenizer files
    ("tokenizer_json_not_json", write("tokenizer.json", "{nope"), ["tokenizer.json", "not valid JSON"]),
    ("tokenizer_json_a_list", write("tokenizer.json", "[]"), ["tokenizer.json", "not an object"]),
    ("tokenizer_json_wrong_fields", write("tokenizer.json", '{"model": 3}'), ["tokenizer.json", "tokenizer"]),
    ("tokenizer_config_not_json", write("tokenizer_config.json", "{nope"), ["tokenizer_config.json", "JSON"]),
    ("tokenizer_config_a_list", write("tokenizer_config.json", "[1]"), ["tokenizer_config.json", "not an object"]),
    ("tokenizer_class_a_number", tokenizer_config(tokenizer_class=5), ["tokenizer_config.json", "tokenizer"]),
    ("special_tokens_map_not_json", write("special_tokens_map.json", "{nope"), ["special_tokens_map.json", "JSON"]),
    ("tokenizer_json_a_folder", replace_by_folder("tokenizer.json"), ["tokenizer.json", "folder"]),
    ("tokenizer_json_links_outside", link_outside("tokenizer.json"), ["tokenizer.json", "outside"]),
    ("chat_templates_folder_links_outside", lambda m: _linked_templates(m), ["evil.jinja", "outside"]),
    ("tiktoken_links_outside", lambda m: (m / "tokenizer.tiktoken").symlink_to("/etc/hostname"),
     ["tokenizer.tiktoken", "outside"]),
    ("tokenizer_ids_beyond_vocab", lambda m: _shift_tokenizer_ids(m, 1000), ["tokenizer.json", "vocab_size is 512"]),
    ("no_tokenizer_files", lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
     ["tokenizer"]),
]


@pytest.fixture
def user(tmp_path):
    """A user's data file and the output folder a recipe names (not created)."""
    data = write_rows(tmp_path / "train.jsonl")
    return data, tmp_path / "out"


def _train(tmp_path: Path, model: Path, data: Path, out: Path, **train):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(model, data, out, **{"max_steps": 1, **train})))
    return run_cli("train", str(recipe))


def _refused_without_a_trace(tmp_path: Path, model: Path, data: Path, out: Path, fragments) -> None:
    before = snapshot(model, data, out)
    result = _train(tmp_path, model, data, out)
    assert_refused(result, *fragments)
    assert changed(before, snapshot(model, data, out)) == []
    assert not out.exists()
    assert not (tmp_path / "code-ran").exists()  # no file of the folder was ever imported


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_micro_folder_is_refused_naming_the_file(case, micro_model, tmp_path, user, monkeypatch):
    _, breaks, fragments = case
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    breaks(model)
    # transformers asks "[y/N]" before running a folder's code: nothing may ever ask
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("qshard let transformers prompt"))
    _refused_without_a_trace(tmp_path, model, *user, fragments)


GPTQ = "gptq_llama_w4_g32_sym"  # hidden 64, intermediate 128, q_proj qweight [8, 64]
CT = "ct_llama_w4a16_g32_sym"
PTQ_CASES = [
    ("gptq_vocab_mismatch", GPTQ, config(vocab_size=600), [WEIGHTS, "model.embed_tokens.weight", "vocab_size"]),
    ("gptq_intermediate_mismatch", GPTQ, config(intermediate_size=96),
     [WEIGHTS, "gptq layer model.layers.0.mlp", "intermediate_size"]),
    ("gptq_qzeros_missing", GPTQ, weights(lambda t: t.pop("model.layers.0.self_attn.k_proj.qzeros")),
     [WEIGHTS, "qzeros missing", "model.layers.0.self_attn.k_proj"]),
    ("gptq_g_idx_too_short", GPTQ, weights(lambda t: t.update({"model.layers.0.self_attn.q_proj.g_idx":
                                                               torch.zeros(10, dtype=torch.int32)})),
     [WEIGHTS, "model.layers.0.self_attn.q_proj", "do not form a layer"]),
    ("gptq_scales_wrong", GPTQ, weights(lambda t: t.update({"model.layers.0.self_attn.q_proj.scales":
                                                            torch.ones(2, 32, dtype=torch.float16)})),
     [WEIGHTS, "model.layers.0.self_attn.q_proj"]),
    ("gptq_qweight_1d", GPTQ, weights(lambda t: t.update({"model.layers.0.self_attn.q_proj.qweight":
                                                          torch.zeros(512, dtype=torch.int32)})),
     [WEIGHTS, "model.layers.0.self_attn.q_proj"]),
    ("ct_weight_shape_disagrees", CT, weights(lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_shape":
                                                                 torch.tensor([64, 128])})),
     [WEIGHTS, "model.layers.0.self_attn.q_proj", "weight_shape"]),
    ("ct_config_groups_a_list", CT, lambda m: config(quantization_config={
        **json.loads((m / "config.json").read_text())["quantization_config"], "config_groups": [1]})(m),
     ["config.json", "quantization_config"]),
    ("gptq_bits_text", GPTQ, lambda m: config(quantization_config={
        **json.loads((m / "config.json").read_text())["quantization_config"], "bits": "four"})(m),
     ["config.json", "quantization_config"]),
]


@pytest.mark.parametrize("case", PTQ_CASES, ids=[c[0] for c in PTQ_CASES])
def test_hostile_ptq_folder_is_refused_naming_the_tensor(case, tmp_path, user):
    _, fixture, breaks, fragments = case
    model = tmp_path / "model"
    shutil.copytree(PTQ / fixture, model)
    breaks(model)
    _refused_without_a_trace(tmp_path, model, *user, fragments)


# -- positive controls: legitimate folders that look unusual --------------------------------------------

def _hub_cache(micro_model: Path, root: Path) -> Path:
    """The micro model laid out as the Hugging Face cache stores it: every file of the snapshot a
    relative symlink into the repository's blobs/."""
    repo = root / "hub" / "models--qshard--micro-llama"
    snapshot_dir = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for i, file in enumerate(sorted(micro_model.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot_dir / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snapshot_dir


def test_hub_cache_snapshot_of_symlinks_loads(micro_model, tmp_path):
    model = _hub_cache(micro_model, tmp_path)
    assert all((model / f.name).is_symlink() for f in micro_model.iterdir())
    loaded = load.load_model(str(model), quant=QuantSpec("none"), log=lambda *_: None)
    reference = load.load_model(str(micro_model), quant=QuantSpec("none"), log=lambda *_: None)
    assert torch.equal(loaded.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert load_tokenizer(model).encode("The sky is blue.") == load_tokenizer(micro_model).encode("The sky is blue.")


def test_symlinked_model_folder_and_sharded_index_open(micro_model, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(micro_model, real)
    sharded()(real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    model_dir, skeleton = open_base(str(tmp_path / "link"), quant=QuantSpec("nf4"))
    assert [f.name for f in load.checkpoint_files(model_dir)] == ["model-00001-of-00002.safetensors",
                                                                  "model-00002-of-00002.safetensors"]
    assert all(p.device.type == "meta" for p in skeleton.parameters())


def test_link_inside_the_folder_is_followed(micro_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    (model / "weights-v1.safetensors").write_bytes((model / WEIGHTS).read_bytes())
    (model / WEIGHTS).unlink()
    (model / WEIGHTS).symlink_to("weights-v1.safetensors")
    open_base(str(model), quant=QuantSpec("nf4"))


def test_link_from_a_snapshot_to_another_repository_is_refused(micro_model, tmp_path):
    """The hub-cache exception is this repository's blobs/ only."""
    model = _hub_cache(micro_model, tmp_path)
    other = tmp_path / "hub" / "models--someone--else" / "blobs"
    other.mkdir(parents=True)
    shutil.copy(micro_model / WEIGHTS, other / "x")
    (model / WEIGHTS).unlink()
    (model / WEIGHTS).symlink_to(other / "x")
    with pytest.raises(QShardError, match="outside the model folder") as e:
        open_base(str(model))
    assert e.value.where == str(model / WEIGHTS)


def test_extra_tensors_are_logged_not_fatal(micro_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    weights(lambda t: t.update({"model.layers.0.mlp.extra_scale": torch.ones(3),
                                "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))(model)
    said = []
    loaded = load.load_model(str(model), quant=QuantSpec("none"), log=said.append)
    assert said == [("ignoring 2 checkpoint tensor(s) this architecture has no place for: "
                     "model.layers.0.mlp.extra_scale, model.layers.0.self_attn.q_proj.bias")]
    assert loaded.model.layers[0].self_attn.q_proj.bias is None  # llama has no q_proj bias: never silently added


def test_tied_embeddings_may_omit_the_head(micro_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    config(tie_word_embeddings=True)(model)
    weights(lambda t: t.pop("lm_head.weight"))(model)
    loaded = load.load_model(str(model), quant=QuantSpec("none"), log=lambda *_: None)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_auto_map_fix_names_the_escape(micro_model, tmp_path):
    """The refusal says what to do: an architecture transformers implements; deleting auto_map when
    model_type already names one (as here) makes the folder load with transformers' own class."""
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    config(auto_map={"AutoModelForCausalLM": "modeling_x.X"})(model)
    with pytest.raises(QShardError) as e:
        open_base(str(model))
    assert e.value.where == f"{model / 'config.json'}: auto_map" and "delete auto_map" in e.value.fix
    config(auto_map=DELETE)(model)
    open_base(str(model))


# -- unit checks on open_base / load_tokenizer ------------------------------------------------------------

def test_open_base_reads_no_tensor_data(micro_model, tmp_path, monkeypatch):
    """Every check of open_base works from the headers: a refusal of a shape comes with 0 tensor reads."""
    reads = []
    monkeypatch.setattr(load.CheckpointReader, "_read_into", lambda self, f, buf, key: reads.append(key) or buf)
    open_base(str(micro_model), quant=QuantSpec("nf4"))
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    config(vocab_size=600)(model)
    with pytest.raises(QShardError, match=r"model\.embed_tokens\.weight is \[512, 64\] but config\.json makes it "
                                          r"\[600, 64\]: config\.json's vocab_size probably disagrees"):
        open_base(str(model), quant=QuantSpec("nf4"))
    assert reads == []


@pytest.mark.parametrize("fixture", [GPTQ, CT, "autoawq_qwen2_w4_g32_zp"])
def test_ptq_layer_checks_read_only_tiny_tensors(fixture, monkeypatch):
    """PTQ layers are checked from stand-ins: only tensors of <= 16 values (compressed-tensors'
    weight_shape) are read."""
    sizes = []
    real = load.CheckpointReader._read_into
    monkeypatch.setattr(load.CheckpointReader, "_read_into",
                        lambda self, f, buf, key: sizes.append(buf.numel()) or real(self, f, buf, key))
    open_base(str(PTQ / fixture), quant=QuantSpec("checkpoint"))
    assert max(sizes, default=0) <= 16


def test_file_truncated_after_open_base_is_named_when_read(micro_model, tmp_path):
    """The headers were checked against the file's length when the reader was made; a file cut later is
    still named by the read itself."""
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    reader = load.CheckpointReader([model / WEIGHTS])
    last = max(reader.keys(), key=lambda k: reader.entries[k][1])
    (model / WEIGHTS).write_bytes((model / WEIGHTS).read_bytes()[:-10])
    with pytest.raises(QShardError, match=f"model.safetensors ends inside tensor {last}: the file is truncated"):
        reader.rows(last)


def test_unreadable_file_is_named(micro_model, tmp_path, monkeypatch):
    """chmod 000 means nothing to root (these tests run as root: os.access says readable), so the
    refusal is checked with the error open() would raise."""
    model = tmp_path / "model"
    shutil.copytree(micro_model, model)
    if os.geteuid() != 0:
        (model / WEIGHTS).chmod(0)
    else:
        real_open = builtins.open
        def deny(file, *a, **k):
            if str(file).endswith(WEIGHTS):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)
        monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(QShardError, match="model.safetensors cannot be read") as e:
        open_base(str(model))
    assert e.value.where == str(model / WEIGHTS)


def test_every_transformers_call_refuses_remote_code(micro_model, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    seen = {}
    for cls, method in ((AutoConfig, "from_pretrained"), (AutoModelForCausalLM, "from_config"),
                        (AutoTokenizer, "from_pretrained")):
        real = getattr(cls, method)
        monkeypatch.setattr(cls, method, lambda arg, _real=real, _name=cls.__name__, **kw:
                            seen.update({_name: kw.get("trust_remote_code")}) or _real(arg, **kw))
    open_base(str(micro_model))
    load_tokenizer(micro_model)
    assert seen == {"AutoConfig": False, "AutoModelForCausalLM": False, "AutoTokenizer": False}
