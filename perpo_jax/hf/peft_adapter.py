"""PEFT LoRA adapters out and in: `adapter_model.safetensors` + `adapter_config.json` exactly as
peft 0.21 saves a `LoraConfig` adapter of the transformers model, and back. The only place that
knows PEFT's names; peft itself is never imported (tests compare against it).

Names. PEFT sees the transformers-5 model in memory: LLaVA (NeXT / OneVision alike) is
`model.language_model.layers.N.…`, `model.vision_tower.…`, `model.multi_modal_projector.…`,
`lm_head` (+ the bare parameter `model.image_newline`); a plain LM is `model.layers.N.…`,
`lm_head`. Its file holds `base_model.model.<module>.lora_A.weight` [r, prod(in)] and
`….lora_B.weight` [prod(out), r] per wrapped nn.Linear, and `base_model.model.<param>` for each
parameter of a `modules_to_save` module. Our side is hf/mapping.py's table: an HF nn.Linear
`<module>.weight` is one Entry (our Linear; layer i of a stacked tower), and the adapter goes
through the kernels' own "linear" transform (A [*in, r] has the kernel's input dims, B [r, *out]
one):

    ours A [L, *in, r], slice i  <->  lora_A.weight [r, prod(in)]
    ours B [L, r, *out], slice i <->  lora_B.weight [prod(out), r]
    scale alpha / rank           <->  lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

Out (`adapter_files`): `target_modules` is a regex PEFT full-matches, built to match exactly the
adapted modules (the LLM's q_proj, never CLIP's); modules trained fully (`lora.trainable`) become
`modules_to_save`, each the largest HF module all of whose parameters are trained.
In (`resolve_lora`, then `apply_lora`, then `load_adapter`): the adapter's config is matched
against the model's module names by PEFT's own rule (target_modules list or regex, "all-linear",
exclude_modules, layers_to_transform / layers_pattern, modules_to_save excluded), so we adapt
exactly the modules PEFT wraps; a stacked layer the adapter leaves out gets A = B = 0.
Adapter keys in the transformers-4 layout (`language_model.model.…`) are read too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open

from perpo_jax.config import ConfigError, LoraConfig
from perpo_jax.hf.config_map import config_to_hf
from perpo_jax.hf.errors import CheckpointError
from perpo_jax.hf.mapping import Entry, canonical_key, entries_for, hf_shape, to_hf, to_ours
from perpo_jax.hf.safetensors_io import write_shard
from perpo_jax.models.config import LlavaConfig
from perpo_jax.models.lora import lora_slots, module_path, path_regex_filter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
PEFT_VERSION = "0.21.2"  # the peft release whose adapter_config.json fields we write
_LORA_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


class AdapterError(CheckpointError):
    """A PEFT adapter we cannot write or read faithfully; the message names the file / field."""


# ----------------------------------------------------------------------------- names

# canonical (hf/mapping.py) -> in-memory prefixes of a LLaVA; `canonical_key` is the inverse
_LLAVA_IN_MEMORY = (("language_model.model.", "model.language_model."),
                    ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."),
                    ("image_newline", "model.image_newline"))


def in_memory_key(key: str, is_llava: bool) -> str:
    """A canonical key of hf/mapping.py -> the name transformers 5 gives it in memory."""
    if is_llava:
        for canon, live in _LLAVA_IN_MEMORY:
            if key.startswith(canon):
                return live + key[len(canon):]
    return key


@dataclasses.dataclass(frozen=True)
class Site:
    """One transformers nn.Linear and the (layer of the) Linear of ours it is."""

    name: str  # HF module name in memory, e.g. model.language_model.layers.0.self_attn.q_proj
    path: tuple  # our module path, e.g. ("language_model", "layers", "self_attn", "q_proj")
    layer: int | None  # slice of our stacked Linear; None: not stacked
    n_in: int  # input dims of our kernel


class HfNames:
    """The model's transformers names: parameters (-> Entry), nn.Linear sites, all modules."""

    def __init__(self, config):
        self.is_llava = isinstance(config, LlavaConfig)
        self.hf_config = config_to_hf(config)
        entries = entries_for(config)
        self.params: dict[str, Entry] = {in_memory_key(e.key, self.is_llava): e for e in entries}
        self.sites: dict[str, Site] = {}
        for key, e in self.params.items():
            if e.kind == "linear" and key.endswith(".weight") and e.path[-1] == "kernel":
                name = key[: -len(".weight")]
                self.sites[name] = Site(name, e.path[:-1], e.layer, e.n_in)
        self.modules = sorted({key.rsplit(".", n)[0] for key in self.params
                               for n in range(1, key.count(".") + 1)})

    def live(self, key: str) -> str:
        """A key in any of the LLaVA layouts (v4 hub, v5 save, in memory) -> in memory."""
        return in_memory_key(canonical_key(key, self.is_llava), self.is_llava)

    def sites_by_path(self) -> dict[tuple, list[Site]]:
        out = defaultdict(list)
        for site in self.sites.values():
            out[site.path].append(site)
        return {p: sorted(s, key=lambda x: -1 if x.layer is None else x.layer)
                for p, s in out.items()}


# ----------------------------------------------------------------------------- out


def _layer_pattern(site: Site) -> str:
    """Regex of a site's name with its layer index as `\\d+` (one pattern per stacked Linear)."""
    token = f"layers.{site.layer}."
    if site.layer is None or token not in site.name:
        return re.escape(site.name)
    head, tail = site.name.split(token, 1)
    return re.escape(head + "layers.") + r"\d+" + re.escape("." + tail)


def targets_regex(sites: Sequence[Site]) -> str:
    """One regex PEFT full-matches (`re.fullmatch`) that names exactly `sites`' modules."""
    leaves = defaultdict(set)
    for pattern in {_layer_pattern(s) for s in sites}:
        parent, _, leaf = pattern.rpartition(r"\.")
        leaves[parent].add(leaf)
    parts = []
    for parent, names in sorted(leaves.items()):
        names = sorted(names)
        body = names[0] if len(names) == 1 else f"(?:{'|'.join(names)})"
        parts.append(f"{parent}\\.{body}" if parent else body)
    return "|".join(parts)


def _whole_modules(trained: set[str], names: HfNames) -> list[str]:
    """The largest HF modules all of whose parameters are in `trained` (in-memory keys)."""
    out = set()
    for key in sorted(trained):
        best = None
        for n in range(1, key.count(".") + 1):  # the parameter's own module first, then up
            prefix = key.rsplit(".", n)[0]
            if all(k in trained for k in names.params if k.startswith(prefix + ".")):
                best = prefix
            else:
                break
        if best is None:
            raise AdapterError(f"{key} is trained fully (lora.trainable) but is a bare parameter, "
                               "not a whole module: PEFT's modules_to_save holds whole modules "
                               "only; leave it out of lora.trainable or export merged weights")
        out.add(best)
    return sorted(out)


def _host(value, layer: int | None) -> np.ndarray:
    return np.asarray(jax.device_get(value if layer is None else value[layer]))


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _config_dict(*, rank, alpha, dropout, targets, modules_to_save, base, hf_config) -> dict:
    """adapter_config.json with every field peft 0.21.2 writes for a plain LoRA."""
    model_type = hf_config["model_type"]
    library = f"transformers.models.{model_type}.modeling_{model_type}"
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None,
        "auto_mapping": {"base_model_class": hf_config["architectures"][0],
                         "parent_library": library},
        "base_model_name_or_path": base, "bias": "none", "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "kasa_config": None, "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": None, "loftq_config": {}, "lora_alpha": _number(alpha),
        "lora_bias": False, "lora_dropout": float(dropout), "lora_ga_config": None,
        "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": modules_to_save or None, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": rank,
        "rank_pattern": {}, "revision": None, "target_modules": targets,
        "target_parameters": None, "task_type": None, "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": False, "use_qalora": False, "use_rslora": False,
        "velora_config": None,
    }


def adapter_files(model, *, trainable: Sequence[str] = (),
                  base_model_name_or_path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json dict, adapter_model.safetensors tensors) of `model`'s LoRA adapters
    and of the modules `trainable` (lora.trainable regexes) selects, as PEFT saves them."""
    names = HfNames(model.config)
    by_path = names.sites_by_path()
    adapted = [(p, m) for p, m in lora_slots(model) if m.lora is not None]
    if not adapted:
        raise AdapterError("the model has no LoRA adapter to save as a PEFT adapter (a merged "
                           "export is save_pretrained without adapter=True)")
    tensors, sites, shapes = {}, [], set()
    for dotted, linear in adapted:
        path = tuple(dotted.split("."))
        if path not in by_path:
            raise AdapterError(f"LoRA on {dotted}: transformers has no nn.Linear there that PEFT "
                               "could wrap")
        lora = linear.lora
        a, b = lora.a[...], lora.b[...]
        shapes.add((int(a.shape[-1]), float(lora.scale), float(lora.dropout.rate)))
        for site in by_path[path]:
            sites.append(site)
            tensors[f"{PREFIX}{site.name}.lora_A.weight"] = to_hf(
                Entry((), "", "linear", site.n_in), _host(a, site.layer))
            tensors[f"{PREFIX}{site.name}.lora_B.weight"] = to_hf(
                Entry((), "", "linear", 1), _host(b, site.layer))
    if len(shapes) != 1:
        raise AdapterError(f"adapters differ in (rank, scale, dropout) {sorted(shapes)}: one "
                           "PEFT LoraConfig holds one of each")
    ((rank, scale, dropout),) = shapes
    modules = _saved_modules_out(model, trainable, names, sites, tensors)
    config = _config_dict(rank=rank, alpha=scale * rank, dropout=dropout,
                          targets=targets_regex(sites), modules_to_save=modules,
                          base=base_model_name_or_path, hf_config=names.hf_config)
    return config, tensors


def _saved_modules_out(model, trainable, names: HfNames, sites, tensors) -> list[str]:
    """modules_to_save for the params `trainable` selects; their tensors added to `tensors`."""
    if not trainable:
        return []
    state = dict(nnx.to_flat_state(nnx.state(model, path_regex_filter(trainable))))
    trained = {k for k, e in names.params.items() if e.path in state}
    modules = _whole_modules(trained, names)
    for m in modules:
        inside = [s.name for s in sites if s.name == m or s.name.startswith(m + ".")]
        if inside:
            raise AdapterError(f"{m} is trained fully (lora.trainable) and holds LoRA-adapted "
                               f"{inside[0]}: PEFT cannot do both to one module")
    for key in sorted(trained):
        e = names.params[key]
        tensors[PREFIX + key] = to_hf(e, _host(state[e.path].get_value(), e.layer))
    return modules


# ----------------------------------------------------------------------------- in

# Fields that change what the adapter computes in ways we do not: (field, what it must be).
_MUST_BE_OFF = ("use_dora", "use_qalora", "use_bdlora", "lora_bias", "fan_in_fan_out",
                "layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "megatron_config", "rank_pattern", "alpha_pattern")
# LoRA variants with their own config block (eva_config only chooses the initial A: harmless)
_VARIANT_CONFIGS = ("arrow_config", "corda_config", "kasa_config", "loftq_config",
                    "lora_ga_config", "monteclora_config", "velora_config")
# initialisations that rewrite the BASE weights: the adapter is relative to another base
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def _refuse(where: str, field: str, value, why: str):
    raise AdapterError(f"{where}: {field}={value!r}: {why}")


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json of a PEFT LoRA adapter dir, checked for what this project can load."""
    where = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isdir(adapter_dir):
        raise AdapterError(f"PEFT adapter dir {adapter_dir} (lora.init_from): no such directory")
    if not os.path.isfile(where):
        raise AdapterError(f"{adapter_dir} (lora.init_from): no {ADAPTER_CONFIG}, not a PEFT "
                           "adapter dir")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        bin_file = os.path.join(adapter_dir, "adapter_model.bin")
        extra = ""
        if os.path.exists(bin_file):
            extra = (": it holds adapter_model.bin, and only safetensors are read (peft: "
                     "save_pretrained(..., safe_serialization=True))")
        raise AdapterError(f"{adapter_dir} (lora.init_from): no {ADAPTER_WEIGHTS}{extra}")
    try:
        with open(where) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{where}: cannot read: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{where}: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        _refuse(where, "peft_type", cfg.get("peft_type"), "only LORA adapters are supported")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        _refuse(where, "task_type", cfg.get("task_type"), "only CAUSAL_LM / null adapters")
    for field in _MUST_BE_OFF:
        if cfg.get(field):
            _refuse(where, field, cfg[field], "not supported (a plain LoRA is x·A·B·scale)")
    for field in _VARIANT_CONFIGS:
        if cfg.get(field):
            _refuse(where, field, cfg[field], "this LoRA variant is not supported")
    if cfg.get("bias", "none") != "none":
        _refuse(where, "bias", cfg["bias"], "trained biases are not supported (need 'none')")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        _refuse(where, "init_lora_weights", init, "this initialisation rewrites the base "
                "weights, so the adapter does not apply to the unchanged base model")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        _refuse(where, "r", r, "must be a positive integer")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        _refuse(where, "lora_alpha", alpha, "must be a number")
    dropout = cfg.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        _refuse(where, "lora_dropout", dropout, "must be in [0, 1)")
    if not cfg.get("target_modules"):
        _refuse(where, "target_modules", cfg.get("target_modules"), "no module is targeted")
    return cfg


def peft_targets(cfg: dict, name: str) -> bool:
    """Whether PEFT puts a LoRA on module `name` (peft 0.21's `check_target_module_exists`)."""
    exclude = cfg.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in cfg.get("modules_to_save") or ()):
        return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    found = any(name.endswith(f".{t}") for t in targets)
    layers = cfg.get("layers_to_transform")
    if not found or layers is None or (isinstance(layers, list) and not layers):
        return found
    pattern = cfg.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def adapter_sites(cfg: dict, names: HfNames, where: str) -> list[Site]:
    """The nn.Linear sites PEFT wraps for adapter config `cfg` (an error for anything else)."""
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT expands it to every nn.Linear but the output embedding
        cfg = dict(cfg, target_modules=[n for n in names.sites if n != "lm_head"])
    matched = [n for n in names.modules if peft_targets(cfg, n)]
    if not matched:
        _refuse(where, "target_modules", targets, "matches no module of the model")
    other = [n for n in matched if n not in names.sites]
    if other:
        _refuse(where, "target_modules", targets,
                f"matches {', '.join(other[:4])}{' ...' if len(other) > 4 else ''}, which "
                "this project cannot put a LoRA on (only nn.Linear layers it maps)")
    return [names.sites[n] for n in matched]


def _modules_to_save_in(cfg: dict, names: HfNames, where: str) -> list[str]:
    """In-memory parameter keys of the modules PEFT saves whole (`modules_to_save`)."""
    keys = []
    for m in cfg.get("modules_to_save") or ():
        hits = [n for n in names.modules if n.endswith(m)]  # PEFT's rule: a plain suffix
        if not hits:
            _refuse(where, "modules_to_save", cfg["modules_to_save"], f"{m!r} matches no module "
                    "with parameters")
        keys += [k for k in names.params if any(k.startswith(h + ".") for h in hits)]
    return sorted(set(keys))


def resolve_lora(lora_cfg: LoraConfig, model) -> LoraConfig:
    """`lora_cfg` with rank / alpha / dropout / targets read from `lora_cfg.init_from`'s
    adapter_config.json (unchanged without init_from).

    Precedence: the adapter's values replace the schema defaults; a lora.* value set to
    something else than both its default and the adapter's is a ConfigError naming the key and
    both values. Targets become exact path regexes of the Linears PEFT wraps. rslora's scale
    alpha / sqrt(r) is expressed as our alpha / r with alpha = lora_alpha · sqrt(r).
    """
    if lora_cfg.init_from is None:
        return lora_cfg
    cfg = read_adapter_config(lora_cfg.init_from)
    where = os.path.join(lora_cfg.init_from, ADAPTER_CONFIG)
    paths = sorted({module_path(s.path) for s in adapter_sites(cfg, HfNames(model.config), where)})
    r = cfg["r"]
    alpha = float(cfg["lora_alpha"]) * (math.sqrt(r) if cfg.get("use_rslora") else 1.0)
    dropout = float(cfg.get("lora_dropout", 0.0))
    default = LoraConfig()
    for key, ours, theirs, field in (("rank", lora_cfg.rank, r, "r"),
                                     ("alpha", lora_cfg.alpha, alpha, "lora_alpha"),
                                     ("dropout", lora_cfg.dropout, dropout, "lora_dropout")):
        if ours != getattr(default, key) and not math.isclose(ours, theirs, rel_tol=1e-9):
            note = " (use_rslora: lora_alpha · sqrt(r) in our alpha / rank)" if (
                key == "alpha" and cfg.get("use_rslora")) else ""
            raise ConfigError(f"lora.{key}={ours} but lora.init_from's {where} has "
                              f"{field}={cfg.get(field)}{note}: leave lora.{key} at its default "
                              f"({getattr(default, key)}) or set it to {theirs}")
    if list(lora_cfg.targets) != list(default.targets):
        ours = sorted(p for p, _ in lora_slots(model)
                      if any(re.search(t, p) for t in lora_cfg.targets))
        if ours != paths:
            raise ConfigError(f"lora.targets {list(lora_cfg.targets)} select {ours} but "
                              f"lora.init_from's {where} targets {paths}: leave lora.targets at "
                              "its default or make it select the same layers")
    return dataclasses.replace(lora_cfg, rank=r, alpha=alpha, dropout=dropout,
                               targets=[f"^{re.escape(p)}$" for p in paths])


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (bfloat16 as ml_dtypes': safetensors_io)."""
    try:
        with safe_open(path, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise AdapterError(f"{path}: not a readable safetensors file: {e}") from e


def _file_keys(tensors: dict, names: HfNames, where: str) -> dict[str, np.ndarray]:
    """File keys (any LLaVA layout, `base_model.model.` prefix) -> in-memory names."""
    out, foreign = {}, []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            foreign.append(key)
            continue
        name = key[len(PREFIX):]
        for suffix in _LORA_SUFFIXES.values():
            if name.endswith(suffix):
                module = names.live(name[: -len(suffix)] + ".weight")[: -len(".weight")]
                out[module + suffix] = value
                break
        else:
            out[names.live(name)] = value
    if foreign:
        raise AdapterError(f"{where}: keys without the {PREFIX!r} prefix: {foreign[:4]}")
    return out


def _to_ours(entry: Entry, array: np.ndarray, var_shape: tuple, layer: int | None, key: str,
             where: str) -> np.ndarray:
    """One file tensor in our layout (one layer's slice of a stacked variable)."""
    shape = tuple(var_shape[1:]) if layer is not None else tuple(var_shape)
    want = hf_shape(entry, shape)
    if tuple(array.shape) != want:
        raise AdapterError(f"{where}: {PREFIX}{key} has shape {list(array.shape)}, the model "
                           f"needs {list(want)}")
    return to_ours(entry, array, shape)


def _adapter_values(cfg, tensors, names: HfNames, state: dict, where: str) -> dict:
    """{our variable path: full host array} of the adapter's A / B and saved modules."""
    values: dict[tuple, np.ndarray] = {}

    def put(path, array, layer):
        if layer is None:
            values[path] = array
        else:  # a layer the adapter leaves out keeps A = B = 0: it adds exactly nothing
            if path not in values:
                values[path] = np.zeros(state[path].get_value().shape, array.dtype)
            values[path][layer] = array

    for site in adapter_sites(cfg, names, where):
        for which, suffix in (("a", _LORA_SUFFIXES["A"]), ("b", _LORA_SUFFIXES["B"])):
            path = site.path + ("lora", which)
            if path not in state:
                raise AdapterError(f"{module_path(site.path)} has no LoRA to load {where} into: "
                                   "apply_lora(model, resolve_lora(...)) first")
            entry = Entry((), "", "linear", site.n_in if which == "a" else 1)
            key = site.name + suffix
            put(path, _to_ours(entry, tensors[key], state[path].get_value().shape, site.layer,
                               key, where), site.layer)
    for key in _modules_to_save_in(cfg, names, where):
        e = names.params[key]
        put(e.path, _to_ours(e, tensors[key], state[e.path].get_value().shape, e.layer, key,
                             where), e.layer)
    return values


def load_adapter(model, adapter_dir: str, *, trainable: Sequence[str] | None = None):
    """Loads a PEFT LoRA adapter dir into `model` (in place; returns it): A / B into the LoRAs
    that `apply_lora(model, resolve_lora(LoraConfig(init_from=adapter_dir), model), rngs)`
    attached, `modules_to_save` parameters over the model's own. `trainable` (lora.trainable):
    when given, every saved module must be trainable by it. Nothing is changed on an error."""
    cfg = read_adapter_config(adapter_dir)
    where = os.path.join(adapter_dir, ADAPTER_CONFIG)
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    names = HfNames(model.config)
    sites = adapter_sites(cfg, names, where)
    saved = _modules_to_save_in(cfg, names, where)
    tensors = _file_keys(_read_tensors(weights), names, weights)
    expected = {s.name + suffix for s in sites for suffix in _LORA_SUFFIXES.values()} | set(saved)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise AdapterError(f"{weights} does not match {where} on this model: missing "
                           f"{[PREFIX + k for k in missing[:4]]} ({len(missing)}), unexpected "
                           f"{[PREFIX + k for k in unexpected[:4]]} ({len(unexpected)})")
    wrapped = {s.path for s in sites}
    extra = [p for p, m in lora_slots(model) if m.lora is not None
             and tuple(p.split(".")) not in wrapped]
    if extra:
        raise AdapterError(f"the model has LoRA on {extra[:4]}, which {where} does not target: "
                           "apply_lora(model, resolve_lora(...)) with the adapter's targets")
    if trainable is not None and saved:
        allowed = dict(nnx.to_flat_state(nnx.state(model, path_regex_filter(trainable))))
        frozen = [k for k in saved if names.params[k].path not in allowed]
        if frozen:
            _refuse(where, "modules_to_save", cfg["modules_to_save"], f"trains {frozen[0]} "
                    f"fully, which lora.trainable {list(trainable)} leaves frozen: add the "
                    "module to lora.trainable")
    state = dict(nnx.to_flat_state(nnx.state(model)))
    values = _adapter_values(cfg, tensors, names, state, where)
    new = []
    for path, array in values.items():
        old = state[path].get_value()
        placed = jax.device_put(array.astype(old.dtype), old.sharding)
        new.append((path, state[path].replace(placed)))
    nnx.update(model, nnx.from_flat_state(new))
    return model


def write_adapter(model, out_dir: str, *, trainable: Sequence[str] = (),
                  base_model_name_or_path: str | None = None) -> None:
    """Writes adapter_config.json + adapter_model.safetensors of `model` into the existing dir
    `out_dir` (callers make it atomic: `hf.save_pretrained(..., adapter=True)`)."""
    config, tensors = adapter_files(model, trainable=trainable,
                                    base_model_name_or_path=base_model_name_or_path)
    write_shard(os.path.join(out_dir, ADAPTER_WEIGHTS), tensors)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
