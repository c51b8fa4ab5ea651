"""Built-in checkpoint formats, each read without executing code from the checkpoint.

| format       | files                              | read with                            |
| ------------ | ---------------------------------- | ------------------------------------ |
| onnx         | one ``*.onnx`` (+ external data)   | onnx, external data only in-folder   |
| huggingface  | ``config.json`` + ``*.safetensors`` | transformers, no remote code         |
| safetensors  | ``*.safetensors``                  | safetensors + configured factory     |
| state_dict   | one ``*.pt`` / ``*.pth``           | ``torch.load(weights_only=True)``    |

Loading runs in a worker process; ``detect`` runs in the daemon and looks at names only.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointRejected
from ..plugins import hookimpl
from ..plugins.api import CheckpointFormat, InputSpec, LoadContext, LoadedCheckpoint, batch_axes
from .data import DATA_FILES

# Sequence length used for token inputs when the checkpoint ships no eval/calibration data.
DEFAULT_SEQUENCE_LENGTH = 128
# Size used for a symbolic non-batch dimension of an ONNX input with no data to tell.
DEFAULT_SYMBOLIC_DIM = 16


def _model_files(files: list[str]) -> list[str]:
    return [f for f in files if f not in DATA_FILES and "/" not in f]


def _inside(directory: Path, candidate: Path) -> bool:
    try:
        candidate.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


class OnnxFormat(CheckpointFormat):
    name = "onnx"
    description = "ONNX model (model.onnx), external data only from inside its folder"

    def detect(self, files):
        return len([f for f in _model_files(files) if f.endswith(".onnx")]) == 1

    def load(self, directory: Path, context: LoadContext) -> LoadedCheckpoint:
        import onnx
        from onnx.external_data_helper import uses_external_data

        # Files only: a folder named x.onnx beside model.onnx is not a second model.
        (name,) = [f.name for f in directory.iterdir() if f.suffix == ".onnx" and f.is_file()]
        path = directory / name
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise CheckpointRejected(f"{path}: not a readable ONNX model ({exc})") from None
        for tensor in model.graph.initializer:
            if not uses_external_data(tensor):
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = directory / location
            if os.path.isabs(location) or ".." in Path(location).parts or not _inside(directory, target):
                raise CheckpointRejected(
                    f"{path}: tensor {tensor.name} points its external data at {location!r}, "
                    "outside the checkpoint folder; external data must sit beside the model"
                )
            if not target.is_file():
                raise CheckpointRejected(f"{path}: external data file {location!r} is missing")
        try:
            onnx.checker.check_model(str(path))
        except Exception as exc:
            raise CheckpointRejected(f"{path}: invalid ONNX model ({exc})") from None
        initializers = {t.name for t in model.graph.initializer}
        graph_inputs = [value for value in model.graph.input if value.name not in initializers]

        def dimension(dim):
            return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else dim.dim_param or None
        shapes = {value.name: [dimension(d) for d in value.type.tensor_type.shape.dim] for value in graph_inputs}
        axes = batch_axes(shapes)
        inputs = []
        for value in graph_inputs:
            # Batch first, as every array the pipeline holds is: the batch (dimension
            # ``axes[name]`` of the model's own shape) leads, where the input has one.
            axis, own = axes[value.name], shapes[value.name]
            rest = [(i, d) for i, d in enumerate(own) if i != axis]
            shape = [-1] + [d if isinstance(d, int) else DEFAULT_SYMBOLIC_DIM for _, d in rest]
            # The graph's own names for the dimensions that vary.
            names = ["batch"] + [None if isinstance(d, int) else d or f"dim{i}" for i, d in rest]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
            inputs.append(InputSpec(value.name, tuple(shape), dtype, dims=tuple(names), batch_axis=axis))
        info = {"opset": max((o.version for o in model.opset_import), default=0)}
        output = model.graph.output[0].name if model.graph.output else "output"
        return LoadedCheckpoint(self.name, inputs, onnx_path=path, info=info, output=output)


def import_factory(spec: str):
    """The callable a ``module:callable`` factory spec names (ImportError or
    AttributeError when there is none); used to load a checkpoint and to rebuild a
    streamed variant's skeleton."""
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _import_factory(spec: str, model: str):
    try:
        factory = import_factory(spec)
    except (ImportError, AttributeError) as exc:
        raise CheckpointRejected(
            f"architecture factory {spec!r} for model {model!r} cannot be imported ({exc}); "
            "fix [architectures.%s] factory in the config" % model
        ) from None
    return factory


def _build_from_factory(context: LoadContext, state_dict: dict, where: Path):
    arch = context.architecture
    if arch is None or not arch.factory:
        raise CheckpointRejected(
            f"{where}: weights without an architecture, and no factory is configured for "
            f"model {context.model!r}; add [architectures.{context.model}] factory = "
            "'module:callable' to the config"
        )
    module = _import_factory(arch.factory, context.model)()
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointRejected(
            f"{where}: weights do not fit the module built by {arch.factory}: "
            f"{' '.join(first[:3])}"
        ) from None
    module.eval()
    inputs = []
    if arch.input_shape:
        inputs = [InputSpec("input", (-1, *arch.input_shape), arch.input_dtype)]
    params = sum(p.numel() for p in module.parameters())
    return module, inputs, {"parameters": params, "factory": arch.factory}


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    description = "*.safetensors weights built into a module by a factory named in the config"

    def detect(self, files):
        names = _model_files(files)
        return "config.json" not in names and any(f.endswith(".safetensors") for f in names)

    def load(self, directory: Path, context: LoadContext) -> LoadedCheckpoint:
        from safetensors.torch import load_file

        state: dict = {}
        for path in sorted(directory.glob("*.safetensors")):
            try:
                state.update(load_file(str(path)))
            except Exception as exc:
                raise CheckpointRejected(f"{path}: not a valid safetensors file ({exc})") from None
        module, inputs, info = _build_from_factory(context, state, directory)
        return LoadedCheckpoint(self.name, inputs, module=module, info=info)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding the module's code beside its constants."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.split("/", 1)[-1].startswith("code/") or name.endswith("/constants.pkl") for name in names)


class StateDictFormat(CheckpointFormat):
    name = "state_dict"
    description = "PyTorch state dict (*.pt/*.pth) loaded with torch.load(weights_only=True) + factory"

    def detect(self, files):
        return len([f for f in _model_files(files) if f.endswith((".pt", ".pth"))]) == 1

    def load(self, directory, context):
        import pickle

        import torch

        (path,) = [p for p in directory.iterdir() if p.suffix in (".pt", ".pth")]
        if _is_torchscript(path):
            raise CheckpointRejected(
                f"{path}: is a TorchScript archive, which holds code and is never loaded; ship the "
                "weights instead (model.safetensors, or a state dict saved with torch.save(model.state_dict())) "
                "with a factory in [architectures.<model>], or the model exported to ONNX (model.onnx)"
            )
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            reason = _unpickling_cause(exc)
            raise CheckpointRejected(
                f"{path}: holds objects that a weights-only load refuses ({reason}); "
                "it is never unpickled. Save a plain state dict or safetensors instead"
            ) from None
        except Exception as exc:
            raise CheckpointRejected(f"{path}: not a readable PyTorch file ({exc})") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointRejected(f"{path}: not a state dict (a mapping of names to tensors)")
        module, inputs, info = _build_from_factory(context, state, path)
        return LoadedCheckpoint(self.name, inputs, module=module, info=info)


def _unpickling_cause(exc: Exception) -> str:
    """What a weights-only load refused, without torch's advice to retry with
    ``weights_only=False`` (which runs the file's code: never for an untrusted file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))
              and "weights_only" not in line]
    # torch also suggests allowlisting the global "if you trust" it: the file is not trusted.
    return causes[0].split(" Please use")[0] if causes else type(exc).__name__


def _check_described_size(directory: Path, cls, transformers) -> None:
    """Refuse a config that describes a far bigger model than its weights hold (a
    vocabulary of 25 M, 10,000 layers): built on the meta device first, which takes no
    memory, so the real load cannot grow a worker without bound."""
    import torch

    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True,
                                                         trust_remote_code=False)
        with torch.device("meta"):
            skeleton = (transformers.AutoModel.from_config(config) if cls is transformers.AutoModel
                        else cls(config))
    except Exception as exc:
        raise CheckpointRejected(f"{directory / 'config.json'}: transformers cannot build the model it describes "
                                 f"({type(exc).__name__}: {exc})") from None
    described = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    # Weights may be 16-bit where the model builds 32-bit parameters, and tied or
    # initialised ones (position ids, heads) need not be stored: 4x leaves room for both.
    if described > 4 * weights + 64 * 2**20:
        raise CheckpointRejected(
            f"{directory / 'config.json'}: describes a model of {described / 2**30:.1f} GiB of parameters, but its "
            f"*.safetensors hold {weights / 2**30:.2f} GiB; the config does not match the weights")


def _check_safetensors(path: Path) -> None:
    """Parse the header only (it bounds every tensor by the file's size): cheap, and the
    error names the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as exc:
        raise CheckpointRejected(f"{path}: not a valid safetensors file ({exc})") from None


def hf_wrapper(model, input_names=("input_ids",), output: str | None = None):
    """Wrap a transformers model so it takes its inputs by position, in ``input_names``
    order, and returns one tensor: ``output`` of its results (by default ``logits``, else
    ``last_hidden_state``). Without an ``attention_mask`` input every token is attended."""
    import torch

    class HuggingFaceForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.input_names = tuple(input_names)
            self.output_name = output

        def forward(self, *inputs):
            named = dict(zip(self.input_names, inputs))
            if "attention_mask" not in named:
                named["attention_mask"] = torch.ones_like(named["input_ids"])
            out = self.inner(**named)
            if self.output_name is not None:
                return out[self.output_name]
            for key in ("logits", "last_hidden_state"):
                if key in out:
                    return out[key]
            return out[0]

        @contextlib.contextmanager
        def exporting_to_onnx(self):
            """Export the eager attention graph, then go back to what torch serves fastest.

            onnxruntime's kernels and fusions know the eager attention's MatMul/Softmax
            pattern; the graph exported from SDPA is another, slower one there.
            """
            before = getattr(self.inner.config, "_attn_implementation", None)
            switch = getattr(self.inner, "set_attn_implementation", None)
            if switch is None or before in (None, "eager"):
                yield
                return
            try:
                switch("eager")
            except (ValueError, ImportError):  # an architecture without an eager path
                yield
                return
            try:
                yield
            finally:
                switch(before)

    return HuggingFaceForward(model).eval()


# Files a Hugging Face folder's serving code reads beside the weights: they travel into
# every variant folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "preprocessor_config.json",
)
# Architectures whose position ids start after the padding index, so two positions of
# max_position_embeddings are never a token's.
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text")


def _tokenizer(directory: Path):
    """The folder's own tokenizer, or None when it ships none (or one transformers cannot
    read without remote code)."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception:
        return None


def _encoder_inputs(model, tokenizer) -> tuple[str, ...]:
    """What an encoder's serving code passes: token ids, the attention mask, and token
    type ids where the tokenizer makes them (or, without one, the model uses them), in
    the order of the model's ``forward``."""
    import inspect

    accepted = list(inspect.signature(model.forward).parameters)
    wanted = {"input_ids", "attention_mask"}
    if tokenizer is not None:
        wanted |= set(getattr(tokenizer, "model_input_names", ())) & {"token_type_ids"}
    elif (getattr(model.config, "type_vocab_size", 0) or 0) > 1:
        wanted.add("token_type_ids")
    return tuple(name for name in accepted if name in wanted)


def _padded_by_hand(tokenizer, texts: list[str], max_length: int, names, config) -> dict:
    """``texts`` tokenized and right-padded to the longest for a tokenizer that has no
    padding token (transformers refuses to pad then): what the padding holds does not
    matter where the attention mask marks it, so the model's own ``pad_token_id`` is used,
    else the tokenizer's end-of-text or unknown token, else 0."""
    import numpy as np

    encoded = [tokenizer(text, truncation=True, max_length=max_length) for text in texts]
    width = max(len(e["input_ids"]) for e in encoded)
    pad = next((t for t in (getattr(config, "pad_token_id", None), tokenizer.eos_token_id, tokenizer.unk_token_id)
                if t is not None), 0)
    rows = {}
    for name in names:
        fill = pad if name == "input_ids" else 0
        rows[name] = np.full((len(encoded), width), fill, dtype=np.int64)
        for i, e in enumerate(encoded):
            values = e.get(name, [1] * len(e["input_ids"]) if name == "attention_mask" else None)
            if values is not None:
                rows[name][i, :len(values)] = values
    return rows


# Windows of text a causal LM is judged on at most: its reference holds a distribution over
# the vocabulary at every position (64 x 128 positions x 32 000 tokens: 1 GiB).
MAX_TEXT_WINDOWS = 64


def _text_windows(tokenizer, length: int):
    """``tokenize`` for a causal LM: the texts' tokens end to end (an end-of-text token
    between texts), cut into rows of ``length``, as language models are evaluated: no
    padding, every position a real next token."""

    def tokenize(texts: list[str], max_length: int) -> dict:
        import numpy as np

        separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream = [token for text in texts for token in tokenizer(text)["input_ids"] + separator]
        width = min(length, len(stream))
        rows = min(len(stream) // width, MAX_TEXT_WINDOWS)
        return {"input_ids": np.asarray(stream[:rows * width], dtype=np.int64).reshape(rows, width)}

    return tokenize


def _output_name(model, input_names) -> str:
    """The name of the result serving code reads (``logits``, ``last_hidden_state``)."""
    import torch

    example = {name: torch.ones(1, 2, dtype=torch.long) if name == "attention_mask"
               else torch.zeros(1, 2, dtype=torch.long) for name in input_names}
    with torch.inference_mode():
        out = model(**example)
    keys = list(out.keys())
    return next((k for k in ("logits", "last_hidden_state") if k in keys), keys[0])


class HuggingFaceFormat(CheckpointFormat):
    name = "huggingface"
    description = "Hugging Face folder (config.json + *.safetensors), never with remote code"

    def detect(self, files):
        names = _model_files(files)
        return "config.json" in names and any(f.endswith(".safetensors") for f in names)

    def load(self, directory, context):
        raw = _read_hf_config(directory / "config.json")
        for weights in sorted(directory.glob("*.safetensors")):
            _check_safetensors(weights)  # a bad file named here, not deep inside transformers
        model = _hf_model(directory, raw)
        vocab = int(getattr(model.config, "vocab_size", None) or 1000)
        positions = int(getattr(model.config, "max_position_embeddings", None) or DEFAULT_SEQUENCE_LENGTH)
        info = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "architecture": type(model).__name__,
        }
        serving_files = sorted(
            name for name in ("config.json", *TOKENIZER_FILES) if (directory / name).is_file())
        tokenizer = _tokenizer(directory)
        if hasattr(model, "can_generate") and model.can_generate():
            return self._causal_lm(model, tokenizer, vocab, positions, info, serving_files)
        return self._encoder(model, tokenizer, vocab, positions, info, serving_files)

    def _causal_lm(self, model, tokenizer, vocab: int, positions: int, info: dict,
                   serving_files: list[str]) -> LoadedCheckpoint:
        """Token ids of any length up to its positions (its forward program scores a
        prompt; its decoding program generates); text becomes windows of the sample
        length, every position a real next token."""
        length = min(DEFAULT_SEQUENCE_LENGTH, positions)
        inputs = [InputSpec("input_ids", (-1, length), "int64", high=vocab, dims=("batch", "sequence"),
                            limits=(("sequence", positions),))]
        return LoadedCheckpoint(self.name, inputs, module=hf_wrapper(model), info=info,
                                tokenize=_text_windows(tokenizer, length) if tokenizer is not None else None,
                                serving_files=serving_files)

    def _encoder(self, model, tokenizer, vocab: int, positions: int, info: dict,
                 serving_files: list[str]) -> LoadedCheckpoint:
        """The inputs its forward takes, as long as its positions and tokenizer allow;
        text is tokenized and padded as the tokenizer does it."""
        limit = positions - 2 if getattr(model.config, "model_type", "") in _PADDING_OFFSET_POSITIONS else positions
        if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < limit:
            limit = int(tokenizer.model_max_length)
        length = min(DEFAULT_SEQUENCE_LENGTH, limit)
        names = _encoder_inputs(model, tokenizer)
        inputs = [
            InputSpec(name, (-1, length), "int64", high=vocab if name == "input_ids" else None,
                      dims=("batch", "sequence"), limits=(("sequence", limit),))
            for name in names
        ]
        output = _output_name(model, names)
        info["tokenizer"] = tokenizer is not None

        def tokenize(texts: list[str], max_length: int) -> dict:
            import numpy as np

            if tokenizer.pad_token is None:
                return _padded_by_hand(tokenizer, texts, max_length, names, model.config)
            encoded = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length,
                                return_tensors="np")
            return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}

        return LoadedCheckpoint(self.name, inputs, module=hf_wrapper(model, names, output), info=info,
                                output=output, tokenize=tokenize if tokenizer is not None else None,
                                serving_files=serving_files)


def _read_hf_config(config_path: Path) -> dict:
    """A Hugging Face folder's config.json, refused where it is not a JSON object or asks
    for remote code."""
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointRejected(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointRejected(f"{config_path}: must hold a JSON object")
    if "auto_map" in raw or raw.get("trust_remote_code"):
        raise CheckpointRejected(
            f"{config_path}: asks for remote code (auto_map), which is never run; "
            "use an architecture that ships with transformers"
        )
    return raw


def _hf_model(directory: Path, raw: dict):
    """The model, by the class its config names where transformers has it (else
    ``AutoModel``), in eval mode."""
    import transformers

    architectures = raw.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures and isinstance(
        architectures[0], str) else None
    # Only a model class: the config must not pick any other callable of transformers.
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    _check_described_size(directory, cls, transformers)
    # The weights in the checkpoint's own dtype (transformers 5's default, asked for by
    # name so that 4.x does the same): a bf16 7B model read as float32 would need 27 GB
    # of host memory before it reached a GPU. Steps cast where they need to.
    own_dtype: dict[str, Any] = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": "auto"}
    try:
        model = cls.from_pretrained(
            str(directory), local_files_only=True, trust_remote_code=False, use_safetensors=True, **own_dtype
        )
    except Exception as exc:
        raise CheckpointRejected(f"{directory}: transformers cannot load it ({exc})") from None
    model.eval()
    return model


BUILTIN_FORMATS = [OnnxFormat(), HuggingFaceFormat(), SafetensorsFormat(), StateDictFormat()]


@hookimpl
def kiln_checkpoint_formats():
    return list(BUILTIN_FORMATS)


def no_format_reason(directory, files) -> str:
    return (
        f"{directory}: no supported model file among {list(files)[:10]}; expected model.onnx, a "
        "Hugging Face folder (config.json + *.safetensors), *.safetensors or a state dict .pt/.pth"
    )


def detect_format(formats, files: list[str]):
    for fmt in formats:
        if fmt.detect(files):
            return fmt
    return None
