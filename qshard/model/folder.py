"""What qshard reads from a model folder, and the rules it reads it by.

A model folder is data from somewhere else: careless or hostile, never trusted.

- Nothing in it is executed. transformers is always called with `trust_remote_code=False`, and a
  folder whose config.json or tokenizer_config.json asks for its own code (`auto_map`, or a
  `model_type` transformers does not implement) is refused before transformers sees it.
- Files are read only inside it. The folder is resolved once. A name in the index is a plain file
  name (no separator, no `..`). Every file qshard or transformers may read (READ_PATTERNS, at the top
  and in READ_FOLDERS, and whatever the index names) is a regular file (not a folder, pipe or
  device) that, symlinks followed, lies inside the folder or, in a Hugging Face cache snapshot
  (`<repo>/snapshots/<revision>/`, whose files all link to `<repo>/blobs/<sha>`), inside that
  repository's `blobs/`. So a folder that is itself a symlink is fine (only where it resolves to
  counts), and so is a link between files of the folder; a link to anywhere else is refused.
- Every file is checked before any weight is read: JSON files are objects; config.json's sizes are
  positive and bounded; safetensors headers are bounded, well formed, and agree with the file's
  length and with each tensor's shape and dtype.

Each refusal is a QShardError whose `where` names the file and the key or tensor.
"""

from __future__ import annotations

import json
import math
import os
import stat
from fnmatch import fnmatch
from pathlib import Path

import torch

from qshard.errors import QShardError

# What the hub download fetches, so what qshard (or transformers for it) may read from a folder: files
# of these names at its top, and in READ_FOLDERS (transformers reads extra chat templates there).
READ_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken")
READ_FOLDERS = ("additional_chat_templates",)
INDEX = "model.safetensors.index.json"
MAX_JSON_BYTES = 100 * 2**20  # config and tokenizer files (a large vocabulary's tokenizer.json: tens of MB)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
# config.json's sizes: positive and bounded. The skeleton builds one module per layer before anything
# can compare it with the checkpoint, so the layer count is bounded tightly (published models: < 200).
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
MAX_LAYERS = 1024
MAX_SIZE = 2**26
_CUSTOM_CODE_FIX = ("use a checkpoint of an architecture transformers implements (if model_type names one and the "
                    "weights follow it, delete auto_map from {name})")


def allowed_roots(model_dir: Path) -> tuple[Path, ...]:
    """Where the folder's files may lie once symlinks are followed."""
    root = model_dir.resolve()
    if root.parent.name == "snapshots":  # a hub cache snapshot: its files link to ../../blobs/<sha>
        return root, root.parent.parent / "blobs"
    return (root,)


def check_entries(model_dir: Path) -> None:
    """Every file of the folder that qshard may read is a regular file inside the folder."""
    roots = allowed_roots(model_dir)
    folders = [model_dir] + [model_dir / name for name in READ_FOLDERS if (model_dir / name).is_dir()]
    for entry in sorted(e for f in folders for e in f.iterdir()):
        if any(fnmatch(entry.name, pattern) for pattern in READ_PATTERNS):
            check_file(entry, roots)


def check_file(path: Path, roots: tuple[Path, ...]) -> None:
    """A regular file (not a folder, pipe or device: a pipe would block the read forever) that,
    symlinks followed, lies under one of `roots`."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise QShardError(f"{path.name} is a link that leads nowhere (a loop)", where=str(path),
                          fix=f"replace {path.name} by the file it should be, or remove it") from None
    if not any(target.is_relative_to(root) for root in roots):  # through a link, or a linked folder
        raise QShardError(f"{path.name} leads to {target}, outside the model folder", where=str(path),
                          fix="copy the file into the model folder (qshard reads only files inside it)")
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise QShardError(f"{path.name} cannot be read ({e.strerror or e})", where=str(path),
                          fix="restore the file (a broken link?) or remove it from the model folder") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
        raise QShardError(f"{path.name} is {kind}, not a file", where=str(path),
                          fix=f"replace {path.name} by the file it should be, or remove it")


def plain_name(name: str) -> bool:
    """A file name that can only mean a file directly inside the folder."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def read_json(path: Path) -> dict:
    """A JSON object from a (checked) file; any problem names the file."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise QShardError(f"{path.name} is {size:,} bytes, more than any real {path.name}", where=str(path),
                              fix=f"replace {path.name} by the model's own file")
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise QShardError(f"{path.name} cannot be read ({e.strerror or e})", where=str(path),
                          fix="make the file readable") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise QShardError(f"{path.name} is not valid JSON ({e})", where=str(path),
                          fix=f"restore {path.name} from the model's source") from None
    if not isinstance(data, dict):
        raise QShardError(f"{path.name} holds a JSON {type(data).__name__}, not an object", where=str(path),
                          fix=f"restore {path.name} from the model's source")
    return data


def read_config(model_dir: Path) -> dict:
    """config.json as a dict: a JSON object naming a model_type that transformers implements, asking
    for no code of its own."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = model_dir / "config.json"
    check_file(file, allowed_roots(model_dir))
    config = read_json(file)
    refuse_custom_code(config, file)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise QShardError(f"config.json has no model_type (found {model_type!r})", where=f"{file}: model_type",
                          fix="restore config.json as save_pretrained writes it (it names the architecture)")
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise QShardError(f"config.json's model_type {model_type!r} is not an architecture transformers "
                          f"{transformers.__version__} implements: the model needs its own code (or a newer "
                          "transformers), and qshard never runs code shipped with a model", where=f"{file}: model_type",
                          fix="use a model of an architecture transformers implements, or upgrade transformers "
                              "if this architecture is new")
    check_sizes(config, CONFIG_MAPPING[model_type], file)
    return config


def refuse_custom_code(data: dict, file: Path) -> None:
    """A config that maps transformers' Auto classes to Python files of the folder (`auto_map`)."""
    if data.get("auto_map"):
        shown = json.dumps(data["auto_map"])[:200]
        raise QShardError(f"{file.name} asks for the model's own Python code (auto_map: {shown}); qshard never "
                          "runs code shipped with a model", where=f"{file}: auto_map",
                          fix=_CUSTOM_CODE_FIX.format(name=file.name))


def check_sizes(config: dict, config_class, file: Path) -> None:
    """config.json's sizes (SIZE_KEYS, under the names `config_class` gives them, at the top or in
    text_config) are whole numbers in [1, bound]: checked before transformers divides by them."""
    names = {config_class.attribute_map.get(name, name): name for name in SIZE_KEYS}
    sections = [("", config)] + ([("text_config.", config["text_config"])]
                                 if isinstance(config.get("text_config"), dict) else [])
    for prefix, section in sections:
        for key, name in names.items():
            value = section.get(key)
            limit = MAX_LAYERS if name == "num_hidden_layers" else MAX_SIZE
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
                raise QShardError(f"config.json: {prefix}{key} is {value!r}; it must be a whole number from 1 to "
                                  f"{limit:,}", where=f"{file}: {prefix}{key}",
                                  fix=f"restore {key} in config.json from the model's source")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the index's, or model.safetensors."""
    roots = allowed_roots(model_dir)
    index = model_dir / INDEX
    if index.exists() or index.is_symlink():
        first_key: dict[str, str] = {}  # file name -> the first tensor the index places in it
        for key, name in read_index(model_dir).items():
            first_key.setdefault(name, key)
        for name, key in first_key.items():
            if not (model_dir / name).exists() and not (model_dir / name).is_symlink():
                raise QShardError(f"{INDEX} places tensor {key} in {name}, which is not in the model folder",
                                  where=f"{index}: weight_map[{key!r}]",
                                  fix="copy the missing file, or download the checkpoint again")
            check_file(model_dir / name, roots)
        return sorted(model_dir / name for name in first_key)
    single = model_dir / "model.safetensors"
    if single.exists() or single.is_symlink():
        check_file(single, roots)
        return [single]
    raise QShardError(f"no safetensors weights in {model_dir}", where="model.path",
                      fix="qshard reads model.safetensors (or a sharded index); convert .bin weights with "
                          "`model.save_pretrained(dir, safe_serialization=True)`")


def read_index(model_dir: Path) -> dict[str, str]:
    """The index's weight_map {tensor: file name}; every name a plain file name."""
    index = model_dir / INDEX
    check_file(index, allowed_roots(model_dir))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise QShardError(f"{INDEX} has no weight_map (found {json.dumps(weight_map)[:100]})",
                          where=f"{index}: weight_map", fix="restore the index: weight_map maps each tensor "
                                                            "name to the file that holds it")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not plain_name(name):
            raise QShardError(f"{INDEX} places tensor {key} in {name!r}, which is not a file name in the model "
                              "folder (qshard reads only files directly inside it)",
                              where=f"{index}: weight_map[{key!r}]",
                              fix="the index must name files of the model folder, e.g. "
                                  "model-00001-of-00002.safetensors")
    return weight_map


def check_index(model_dir: Path, located: dict[str, Path]) -> None:
    """Every tensor the index places in a file is in that file (`located`: tensor -> file holding it)."""
    index = model_dir / INDEX
    if not (index.exists() or index.is_symlink()):
        return
    for key, name in read_index(model_dir).items():
        if key not in located or located[key].name != name:
            raise QShardError(f"{INDEX} places tensor {key} in {name}, but {name} has no tensor {key}",
                              where=f"{index}: weight_map[{key!r}]", fix="the index and the weights do not belong "
                                                                         "together: download the checkpoint again")


def read_header(file: Path) -> dict[str, tuple[int, torch.dtype, list[int]]]:
    """{tensor: (byte offset in the file, dtype, shape)} from a safetensors header, every entry checked
    against the file's length. No tensor data is read."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
            if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
                raise QShardError(f"{file.name} is not a safetensors file: {size:,} bytes, header length "
                                  f"{length:,}", where=str(file), fix="copy or download the checkpoint again")
            raw = f.read(length)
    except OSError as e:
        raise QShardError(f"{file.name} cannot be read ({e.strerror or e})", where=str(file),
                          fix="make the file readable") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise QShardError(f"{file.name} has a safetensors header that is not JSON ({e})", where=str(file),
                          fix="copy or download the checkpoint again") from None
    if not isinstance(header, dict):
        raise QShardError(f"{file.name} has a safetensors header that is not a JSON object", where=str(file),
                          fix="copy or download the checkpoint again")
    data_bytes = size - 8 - length
    return {key: _entry(file, key, info, 8 + length, data_bytes) for key, info in header.items()
            if key != "__metadata__"}


def _entry(file: Path, key: str, info, start: int, data_bytes: int) -> tuple[int, torch.dtype, list[int]]:
    where = f"{file}: tensor {key}"
    count = lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0
    fields = info if isinstance(info, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if (not isinstance(dtype, str) or not isinstance(shape, list) or not all(count(d) for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(count(o) for o in offsets)):
        raise QShardError(f"{file.name}: tensor {key} has a malformed header entry {json.dumps(info)[:200]} (it "
                          "needs a dtype, a shape of sizes and data_offsets [begin, end])", where=where,
                          fix="copy or download the checkpoint again")
    if dtype not in SAFETENSORS_DTYPES:
        raise QShardError(f"{file.name}: tensor {key} has dtype {dtype}, which qshard cannot read", where=where,
                          fix="save the checkpoint in bf16, fp16 or fp32")
    begin, end = offsets
    if begin > end:
        raise QShardError(f"{file.name}: tensor {key} has data_offsets [{begin}, {end}]: its end is before its "
                          "beginning", where=where, fix="copy or download the checkpoint again")
    if end > data_bytes:
        raise QShardError(f"{file.name} ends inside tensor {key}: the file is truncated (or its header is wrong: "
                          f"the tensor's bytes [{begin:,}, {end:,}) of the {data_bytes:,} after the header)",
                          where=where, fix="copy or download the checkpoint again")
    need = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - begin != need:
        raise QShardError(f"{file.name}: tensor {key} is {dtype} of shape {shape} ({need:,} bytes) but its "
                          f"data_offsets span {end - begin:,} bytes", where=where,
                          fix="copy or download the checkpoint again")
    return start + begin, SAFETENSORS_DTYPES[dtype], shape
