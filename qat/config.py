"""Config schema (Hydra ConfigStore) and validation.

The dataclasses below are the schema every YAML under `configs/` extends, so a misspelled key or
a wrong type fails at compose time with OmegaConf's message, before TensorFlow is imported.
Range checks live in `__post_init__`, which runs when `to_settings` turns the composed config
into these objects; library code only ever sees the objects, never a DictConfig.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from qat.errors import ConfigError

PHASE_STEPS = {
    "float": ("float",),
    "quant": ("quant", "export"),
    "all": ("float", "quant", "export"),
}
NORMALIZATIONS = ("unit", "symmetric", "mean_std")
DATASETS = ("digits", "npz", "folder", "tfds", "synthetic", "mnist", "fashion_mnist", "cifar10")
DEFAULT_SIZE = {"digits": 16, "synthetic": 16}  # digits are 8x8: room for two poolings
BUILTIN_MODELS = ("convnet", "resnet", "mobilenet")
MODELS = (*BUILTIN_MODELS, "keras", "target", "file")
BN_MODES = ("params", "fold")
RANGE_MODES = ("ema", "learned")
BN_TARGETS = ("affine", "params")  # what of BN is quantized: the folded pair, or each parameter
BN_FORMATS = ("channel_exponent", "tensor")  # how: per-value exponent, or one grid per vector
BN_VARIANCE_TARGETS = ("inv_std", "variance")
STRATEGIES = ("default", "mirrored", "multiworker")
MIN_BITS, MAX_BITS = 2, 16  # the range tf.quantization.fake_quant_* accepts


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_bits(name: str, value: int) -> None:
    _require(MIN_BITS <= value <= MAX_BITS,
             f"{name}={value} is out of range: use {MIN_BITS}..{MAX_BITS} bits")


@dataclass
class PhaseConfig:
    name: str = "float"

    def __post_init__(self) -> None:
        _require(self.name in PHASE_STEPS,
                 f"phase={self.name} is unknown: use phase=float, phase=quant or phase=all")

    @property
    def steps(self) -> tuple[str, ...]:
        return PHASE_STEPS[self.name]


def default_run_dir(name: str) -> str:
    """runs/NAME for a single run; in a Hydra multirun, the job's own sweep subdirectory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            return str(hc.runtime.output_dir)
    except ValueError:  # not inside a Hydra job (tests, python -m qat.export)
        pass
    return f"runs/{name}"


@dataclass
class RunConfig:
    name: str = "default"
    dir: str = "${qat_run_dir:${run.name}}"  # runs/${run.name}; sweep jobs: <sweep dir>/<job>
    overwrite: bool = False  # allow a new run to replace a finished run's files


@dataclass
class AugmentConfig:
    """Training-only augmentation (tf.image ops in the input pipeline); all off by default."""

    flip: bool = False  # random horizontal flip
    crop_padding: int = 0  # > 0: pad by this many pixels (edge values), random crop back (CIFAR)
    crop_scale_min: float = 1.0  # < 1: random resized crop of [min, 1] of the area (ImageNet)
    brightness: float = 0.0  # > 0: random brightness shift up to this much (images in [0, 1])

    def __post_init__(self) -> None:
        _require(self.crop_padding >= 0, f"data.augment.crop_padding={self.crop_padding} < 0")
        _require(0.05 <= self.crop_scale_min <= 1.0,
                 f"data.augment.crop_scale_min={self.crop_scale_min} must be in [0.05, 1]")
        _require(0.0 <= self.brightness <= 1.0,
                 f"data.augment.brightness={self.brightness} must be in [0, 1]")

    @property
    def active(self) -> bool:
        return (self.flip or self.crop_padding > 0 or self.crop_scale_min < 1.0
                or self.brightness > 0.0)


@dataclass
class DataConfig:
    name: str = "digits"
    path: str | None = None  # data=npz: the .npz file; data=folder: the directory
    # null: images keep their own size (folder: the first image's); N: N×N; [H, W]: H×W.
    # digits and synthetic default to 16 (DEFAULT_SIZE).
    image_size: Any = None
    channels: int | None = None  # null: the source's own; 1 or 3 convert gray <-> RGB
    val_fraction: float = 0.2  # digits/synthetic/folder without val/: held-out share (data.seed)
    seed: int = 0
    cache: bool = False  # folder/tfds: keep decoded images in memory after the first epoch
    tfds_name: str | None = None  # data=tfds: a dataset prepared in data_dir (no downloads)
    data_dir: str | None = None  # data=tfds: tfds' data_dir; null: its default
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # After scaling to [0, 1] (and augmentation): unit keeps [0, 1]; symmetric is (p - 128)/128
    # on 0..255 pixels, [-1, 127/128] (TFLite's int8 image models; not x/127.5 - 1, see README);
    # mean_std computes (x - data.mean) / data.std, one value or one per channel, [0, 1] units
    # (ImageNet: mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]).
    normalize: str = "unit"
    mean: list[float] | None = None
    std: list[float] | None = None
    # data=synthetic only
    num_classes: int = 10
    train_examples: int = 512
    val_examples: int = 128

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, f"data={self.name} is unknown: use one of {DATASETS}")
        if self.image_size is None:
            self.image_size = DEFAULT_SIZE.get(self.name)
        size = self.image_size
        if isinstance(size, list | tuple):
            size = list(size)
            _require(len(size) == 2 and all(isinstance(v, int) for v in size),
                     f"data.image_size={size} must be N or [height, width]")
            self.image_size = size
        values = size if isinstance(size, list) else [size]
        _require(size is None or all(isinstance(v, int) and not isinstance(v, bool)
                                     and v >= 4 for v in values),
                 f"data.image_size={size} must be an integer >= 4 or [height, width]")
        _require(0.0 < self.val_fraction < 1.0,
                 f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        _require(self.name not in ("npz", "folder") or bool(self.path),
                 f"data={self.name} needs data.path=...")
        _require(self.name != "tfds" or bool(self.tfds_name),
                 "data=tfds needs data.tfds_name=NAME (a dataset prepared in data.data_dir)")
        _require(self.num_classes >= 2, f"data.num_classes={self.num_classes} must be >= 2")
        _require(self.channels in (None, 1, 3), f"data.channels={self.channels} must be 1 or 3")
        _require(self.train_examples > 0 and self.val_examples > 0,
                 "data.train_examples and data.val_examples must be > 0")
        _require(self.normalize in NORMALIZATIONS,
                 f"data.normalize={self.normalize} is unknown: use one of {NORMALIZATIONS}")
        stats = (self.mean, self.std)
        if self.normalize == "mean_std":
            _require(all(v is not None and len(v) in (1, 3) for v in stats),
                     "data.normalize=mean_std needs data.mean and data.std: one value each or "
                     "one per channel, e.g. data.mean=[0.485,0.456,0.406]")
            _require(len(self.mean) == len(self.std), "data.mean and data.std must have "
                     f"the same length, got {len(self.mean)} and {len(self.std)}")
            _require(all(s > 0 for s in self.std), f"data.std={self.std} must be > 0")
        else:
            _require(stats == (None, None), f"data.mean/data.std are used by "
                     f"data.normalize=mean_std only (data.normalize={self.normalize})")

    def pixel_affine(self) -> tuple[list[float], list[float]]:
        """(scale, offset), one value or one per channel: the model input is pixel·scale +
        offset, with pixels in [0, 1]."""
        if self.normalize == "symmetric":  # (pixel - 128) / 128 on 0..255 pixels
            return [255.0 / 128.0], [-1.0]
        if self.normalize == "mean_std":
            return [1.0 / s for s in self.std], [-m / s for m, s in zip(self.mean, self.std,
                                                                         strict=True)]
        return [1.0], [0.0]

    def normalized_range(self, low: float, high: float) -> list[float]:
        """[low, high] in pixel units as the model input sees it: one range over all channels
        (the file's input has one scale)."""
        scale, offset = self.pixel_affine()
        ends = [v * s + o for s, o in zip(scale, offset, strict=True) for v in (low, high)]
        return [min(ends), max(ends)]

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) every image is resized to, or None: keep the source's size."""
        if self.image_size is None:
            return None
        if isinstance(self.image_size, list):
            return tuple(self.image_size)  # type: ignore[return-value]
        return (self.image_size, self.image_size)


@dataclass
class ModelConfig:
    name: str = "convnet"  # built-in nets, or a source: keras | target | file
    width: int = 16  # built-ins: channels of the first stage; later stages double it
    bn_momentum: float = 0.9  # built-ins: moving stats average ~10 steps (~22 steps an epoch)
    bn_epsilon: float = 1e-3  # built-ins: Keras' default
    arch: str | None = None  # model=keras: a tf_keras.applications constructor, e.g. MobileNetV2
    target: str | None = None  # model=target: "package.module:function"
    path: str | None = None  # model=file: a .keras / .h5 file or a SavedModel directory
    weights: str | None = None  # model=keras: a local weights file (nothing is downloaded)
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keywords (arch/target)
    # Every BN's training statistics over the global batch (all replicas), both phases: results
    # independent of the replica count. Off: each replica normalizes its own share (Keras).
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _require(self.name in MODELS, f"model={self.name} is unknown: use one of {MODELS}")
        for source, key in (("keras", "arch"), ("target", "target"), ("file", "path")):
            _require(self.name != source or bool(getattr(self, key)),
                     f"model={source} needs model.{key}=...")
        _require(self.target is None or ":" in self.target,
                 f"model.target={self.target} must read package.module:function")
        _require(self.width >= 1, f"model.width={self.width} must be >= 1")
        _require(0.0 <= self.bn_momentum < 1.0,
                 f"model.bn_momentum={self.bn_momentum} must be in [0, 1)")
        _require(self.bn_epsilon > 0.0, f"model.bn_epsilon={self.bn_epsilon} must be > 0")


SCHEDULES = ("constant", "cosine", "step")


def _adam() -> dict[str, Any]:
    return {"_target_": "tf_keras.optimizers.Adam"}


@dataclass
class ScheduleConfig:
    """Learning rate over a phase: from `learning_rate`, after a linear warmup from 0."""

    name: str = "constant"  # constant | cosine (to 0 at the phase's end) | step
    warmup_epochs: float = 0.0
    decay_epochs: list[int] = field(default_factory=list)  # step: multiply by decay_rate at each
    decay_rate: float = 0.1

    def check(self, where: str, epochs: int) -> None:
        _require(self.name in SCHEDULES,
                 f"{where}.schedule.name={self.name} is unknown: use one of {SCHEDULES}")
        _require(0.0 <= self.warmup_epochs < epochs,
                 f"{where}.schedule.warmup_epochs={self.warmup_epochs} must be >= 0 and shorter "
                 f"than the phase ({epochs} epochs)")
        _require(0.0 < self.decay_rate <= 1.0,
                 f"{where}.schedule.decay_rate={self.decay_rate} must be in (0, 1]")


@dataclass
class TrainerConfig:
    epochs: int = 12
    batch_size: int = 64
    steps_per_epoch: int | None = None  # optional cap per epoch
    seed: int = 0
    learning_rate: float = 3e-3
    # Hydra-instantiated, given the schedule as learning_rate: any tf_keras optimizer or your own
    optimizer: dict[str, Any] = field(default_factory=_adam)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = 0.0  # both phases
    save_every_steps: int | None = None  # also checkpoint mid-epoch, bounding lost work
    strategy: str = "default"
    threads: int = 0  # TensorFlow intra/inter-op threads; 0: TF's default (sweeps: cores / jobs)
    cpu_replicas: int = 1  # >1: that many logical CPUs, mirrored over when there is no GPU
    verbose: int = 1  # Keras progress bar: 0 silent, 1 bar, 2 one line per epoch

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"trainer.epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"trainer.batch_size={self.batch_size} must be >= 1")
        _require(self.steps_per_epoch is None or self.steps_per_epoch >= 1,
                 f"trainer.steps_per_epoch={self.steps_per_epoch} must be >= 1 or null")
        _require(self.learning_rate > 0, f"trainer.learning_rate={self.learning_rate} must be > 0")
        self.schedule.check("trainer", self.epochs)
        _require(0.0 <= self.label_smoothing < 1.0,
                 f"trainer.label_smoothing={self.label_smoothing} must be in [0, 1)")
        _require(self.save_every_steps is None or self.save_every_steps >= 1,
                 f"trainer.save_every_steps={self.save_every_steps} must be >= 1 or null")
        _require(self.threads >= 0, f"trainer.threads={self.threads} must be >= 0")
        _require(self.cpu_replicas >= 1, f"trainer.cpu_replicas={self.cpu_replicas} must be >= 1")
        _require(self.strategy in STRATEGIES,
                 f"trainer.strategy={self.strategy} is unknown: use one of {STRATEGIES}")


@dataclass
class LayerOverride:
    """quant.layers.PATTERN: settings for the layers whose name matches PATTERN (fnmatch)."""

    weight_bits: int | None = None
    activation_bits: int | None = None
    skip: bool = False  # leave in float (the int8 file then needs export.allow_float_ops=true)


def _layer_override(pattern: str, value) -> LayerOverride:
    if isinstance(value, LayerOverride):
        return value
    known = set(LayerOverride.__dataclass_fields__)
    if not isinstance(value, dict) or set(value) - known:
        raise ConfigError(f"quant.layers.{pattern}={value} is not a layer override: use keys "
                          f"{sorted(known)}, e.g. quant.layers={{{pattern}:{{weight_bits:8}}}}")
    return LayerOverride(**value)


@dataclass
class QuantConfig:
    weight_bits: int = 8
    activation_bits: int = 8
    bn_bits: int = 8
    bn: str = "params"  # params: fake-quantize BN's parameters; fold: simulate the folded conv
    # bn=params: affine quantizes the folded multiplier gamma/sqrt(var+eps) and offset
    # beta - mean*multiplier (what integer inference stores); params quantizes gamma, beta,
    # mean and the variance term each (fixed-point BN units that store all four).
    bn_target: str = "affine"
    # channel_exponent: every value its own power-of-two exponent (no channel harms another);
    # tensor: one linear grid per vector, unsigned when the vector is >= 0.
    bn_format: str = "channel_exponent"
    bn_variance: str = "inv_std"  # bn_target=params: quantize 1/sqrt(var+eps), or var itself
    freeze_bn_after_steps: int | None = None  # quant-phase steps; null: never freeze
    # > 0: after the quant phase, set BN moving statistics to the average over this many
    # training batches run through the quantized model (qat.reestimate); 0: off; null: 20
    # when weights or activations are below 8 bits on one device, else off (make experiments)
    bn_reestimate_batches: int | None = None
    activation_ema_decay: float = 0.99  # tfmot hard-codes 0.999: too slow for short fine-tunes
    # ema: activation ranges averaged, kernel ranges = the kernel's extent. learned: both
    # trained with LSQ's gradients (activations: [min, max]; kernels: a per-channel fraction of
    # the extent), starting from the ema values.
    range: str = "ema"
    # range=learned trains the ranges of quantizers with at most this many bits; wider ones
    # (the 8-bit ends below 8 bits, everything at w8a8) keep ema/extent ranges. 8: learn all.
    # 7 because learned 8-bit ranges lost to ema in make experiments (README, Experiments).
    learned_max_bits: int = 7
    # below 8 bits: first/last kernels, their inputs (model input, classifier input), logits: 8
    ends_8_bits: bool = True
    # The model input's range, fixed (not averaged): [0, 1] for qat's images (configs/quant),
    # which makes a uint8 input of the int8 file the raw pixels. null: EMA like activations.
    input_range: list[float] | None = None
    # Per-layer precision: {name pattern: LayerOverride}; later patterns override earlier ones.
    # (Typed as Any for Hydra: `quant.layers={conv1:{weight_bits:8}}` assigns plain dicts.)
    layers: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # float checkpoint dir; null: <run.dir>/float
    epochs: int = 3
    learning_rate: float = 5e-4  # fine-tuning: a fraction of the float phase's rate...
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(name="cosine"))
    optimizer: dict[str, Any] | None = None  # null: the trainer's optimizer

    def __post_init__(self) -> None:
        _check_bits("quant.weight_bits", self.weight_bits)
        _check_bits("quant.activation_bits", self.activation_bits)
        _check_bits("quant.bn_bits", self.bn_bits)
        _require(self.bn in BN_MODES, f"quant.bn={self.bn} is unknown: use one of {BN_MODES}")
        _require(self.bn_target in BN_TARGETS,
                 f"quant.bn_target={self.bn_target} is unknown: use one of {BN_TARGETS}")
        _require(self.bn_format in BN_FORMATS,
                 f"quant.bn_format={self.bn_format} is unknown: use one of {BN_FORMATS}")
        _require(self.bn_variance in BN_VARIANCE_TARGETS,
                 f"quant.bn_variance={self.bn_variance} is unknown: use {BN_VARIANCE_TARGETS}")
        _require(self.freeze_bn_after_steps is None or self.freeze_bn_after_steps >= 0,
                 f"quant.freeze_bn_after_steps={self.freeze_bn_after_steps} must be >= 0 or null")
        _require(self.range in RANGE_MODES,
                 f"quant.range={self.range} is unknown: use one of {RANGE_MODES}")
        _require(1 <= self.learned_max_bits <= 8,
                 f"quant.learned_max_bits={self.learned_max_bits} must be in 1..8 (8: learn "
                 "every range)")
        _require(self.bn_reestimate_batches is None or self.bn_reestimate_batches >= 0,
                 f"quant.bn_reestimate_batches={self.bn_reestimate_batches} must be >= 0")
        _require(0.0 <= self.activation_ema_decay < 1.0,
                 f"quant.activation_ema_decay={self.activation_ema_decay} must be in [0, 1)")
        _require(self.input_range is None or (
            len(self.input_range) == 2 and self.input_range[0] <= 0.0 < self.input_range[1]),
            f"quant.input_range={self.input_range} must be [low, high] with low <= 0 < high")
        self.layers = {pattern: _layer_override(pattern, value)
                       for pattern, value in self.layers.items()}
        for pattern, override in self.layers.items():
            for kind in ("weight_bits", "activation_bits"):
                if getattr(override, kind) is not None:
                    _check_bits(f"quant.layers.{pattern}.{kind}", getattr(override, kind))
        _require(self.epochs >= 1, f"quant.epochs={self.epochs} must be >= 1")
        _require(self.learning_rate > 0, f"quant.learning_rate={self.learning_rate} must be > 0")
        self.schedule.check("quant", self.epochs)


@dataclass
class ExportConfig:
    # false: phase=quant/all end with the quant checkpoint (sweeps that only compare QAT
    # accuracy); `python -m qat.export run.dir=...` exports it later.
    enabled: bool = True
    int8_io: bool = True  # int8 input/output tensors; false keeps float I/O around int8 compute
    # int8_io: the input tensor's type. uint8 with quant.input_range=[0, 1] takes raw pixels.
    input_dtype: str = "int8"
    ptq: bool = False  # also post-training-quantize the float checkpoint, as a baseline
    calibration_batches: int = 8  # PTQ representative dataset size, in batches
    fold_tolerance: float = 1e-4  # max |dlogit| / max |logit| allowed between folded and unfolded
    allow_float_ops: bool = False  # accept an int8 file in which the converter left float ops
    max_examples: int | None = None  # evaluate the files on at most this many validation images

    def __post_init__(self) -> None:
        _require(self.calibration_batches >= 1,
                 f"export.calibration_batches={self.calibration_batches} must be >= 1")
        _require(self.fold_tolerance > 0, "export.fold_tolerance must be > 0")
        _require(self.input_dtype in ("int8", "uint8"),
                 f"export.input_dtype={self.input_dtype} is unknown: use int8 or uint8")
        _require(self.int8_io or self.input_dtype == "int8",
                 "export.input_dtype=uint8 needs export.int8_io=true (integer input)")
        _require(self.max_examples is None or self.max_examples >= 1,
                 f"export.max_examples={self.max_examples} must be >= 1 or null")


@dataclass
class QATConfig:
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def reestimate_batches(self) -> int:
        """BN re-estimation batches: quant.bn_reestimate_batches, or its default."""
        return resolved_reestimate_batches(self.quant.bn_reestimate_batches,
                                           self.quant.weight_bits, self.quant.activation_bits,
                                           self.trainer.strategy)

    @property
    def steps(self) -> tuple[str, ...]:
        """What this run does, in order: the phase's steps, less the export if disabled."""
        return tuple(step for step in self.phase.steps if step != "export" or self.export.enabled)

    def model_quant(self) -> QuantConfig:
        """`quant` with `input_range` in the model's input units: quant.input_range is given in
        pixels ([0, 1]) and goes through data.normalize as the images do."""
        if self.quant.input_range is None:
            return self.quant
        return dataclasses.replace(
            self.quant, input_range=self.data.normalized_range(*self.quant.input_range))


DEFAULT_REESTIMATE_BATCHES = 20


def resolved_reestimate_batches(batches: int | None, weight_bits: int, activation_bits: int,
                                strategy: str = "default") -> int:
    """quant.bn_reestimate_batches=null means: re-estimate below 8 bits, where it helps most
    (README, Experiments), except under tf.distribute, where it cannot run (one device)."""
    if batches is not None:
        return batches
    low = min(weight_bits, activation_bits) < 8
    return DEFAULT_REESTIMATE_BATCHES if low and strategy == "default" else 0


def register_configs() -> None:
    """Store the schema so `configs/config.yaml` extends it (Hydra's structured-config pattern)."""
    cs = ConfigStore.instance()
    cs.store(name="qat_schema", node=QATConfig)
    for group, schema in [("phase", PhaseConfig), ("data", DataConfig), ("model", ModelConfig),
                          ("trainer", TrainerConfig), ("quant", QuantConfig)]:
        cs.store(group=group, name=f"{group}_schema", node=schema)


if not OmegaConf.has_resolver("qat_run_dir"):
    OmegaConf.register_new_resolver("qat_run_dir", default_run_dir)


def to_settings(cfg: DictConfig) -> QATConfig:
    """Resolve the composed config into schema objects, running every range check."""
    try:
        settings = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf's own messages name the key
        raise ConfigError(str(exc).splitlines()[0]) from exc
    if not isinstance(settings, QATConfig):
        raise ConfigError("config root is not the qat schema: keep `qat_schema` in the defaults")
    return settings


def settings_to_dict(settings: QATConfig) -> dict:
    """Plain dict of a resolved config, stored beside every checkpoint."""
    return OmegaConf.to_container(OmegaConf.structured(settings), resolve=True)

