"""Typed trainer configuration (`configs/train/*.yaml`), validated once at load.

| section      | what                                                                       |
|--------------|----------------------------------------------------------------------------|
| `method`     | the adaptation method (`trainer.methods`); its paper's settings are the defaults of the keys below |
| `source`     | the labelled source dataset (kind + root), with more under `source.also`   |
| `target`     | the unlabelled target: harvested crops, an image folder, or a labelled set whose labels are used only for evaluation |
| `model`      | backbone, attention variant, heads and the ablation switches               |
| `loss`       | weights of Eq. 12's terms and the target loss kind                         |
| `clustering` | k-means++ (DAAM) or DBSCAN on the k-reciprocal distance (DAAL)             |
| `arn`, `adfl` | ARN's loss weights and switches; ADFL's attention-feature branch and losses |
| `tcap`       | the tracklet- and camera-aware method's pseudo-label switches, pooling, neck and loss weights |
| `edaan`      | EDAAN's translation networks (sizes), loss weights and margins, attention / discriminator schedule |
| `pretrain`, `adapt` | Algorithm 1's schedules                                             |

Errors are `crossview.kernel.config.ConfigError` naming the file and the dotted key, like the services'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from crossview.kernel.config import ConfigError, _Strict, load_config

LABELLED_KINDS = ("market1501", "dukemtmc", "msmt17", "cuhk03", "folders", "mot")
DatasetKind = Literal["market1501", "dukemtmc", "msmt17", "cuhk03", "folders", "mot"]


class SourceConfig(_Strict):
    kind: DatasetKind
    root: Path = Field(description="dataset folder (for mot: the sequence folder with gt/gt.txt)")
    frame_step: int = Field(1, ge=1, description="mot only: crops from every n-th frame (neighbours are near-duplicates)")
    camera_folders: bool = Field(False, description="folders only: <identity>/<camera>/*.jpg instead of <identity>/*.jpg")
    also: list[SourceConfig] = Field(
        default_factory=list, description="more labelled datasets trained beside this one as one source, their "
        "identities and cameras kept apart (e.g. TUD-Campus plus PKU-Reid); the first stays the source that gates and "
        "metadata name")

    @field_validator("also")
    @classmethod
    def _flat(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        if any(s.also for s in v):
            raise ValueError("a source listed under also cannot have its own also: list every dataset at one level")
        return v


class TargetConfig(_Strict):
    kind: Literal["harvest", "images", "market1501", "dukemtmc", "msmt17", "cuhk03", "folders", "mot"]
    root: Path
    frame_step: int = Field(1, ge=1, description="mot only: crops from every n-th frame")
    evaluate: bool = Field(True, description="report rank-1/mAP on the target's labels (labelled kinds, or evaluate_on)")
    evaluate_on: SourceConfig | None = Field(
        None, description="an unlabelled target (a site harvest): a labelled split of the same footage to report "
        "rank-1/mAP on, e.g. the sequence's MOT ground truth; the training never sees it"
    )

    @property
    def labelled(self) -> bool:
        return self.kind in LABELLED_KINDS


class InputConfig(_Strict):
    height: int = Field(256, ge=32, le=1024)
    width: int = Field(128, ge=16, le=1024)


class ModelConfig(_Strict):
    backbone: Literal["resnet50", "resnet18", "mobilenet_v2"] = "resnet50"
    pretrained: str = Field(
        "imagenet", description="'imagenet', 'none' or a state-dict file of the backbone (relative to the working folder)"
    )
    last_stride: Literal[1, 2] = 1
    attention: Literal["daam", "daal", "ia", "none"] = "daam"
    reduction: int = Field(16, ge=1, description="channel attention reduction r (Eq. 4)")
    head: Literal["fc", "gap"] = Field("fc", description="fc: GAP, FC 256, BN, ReLU (DAAM); gap: plain GAP (DAAL)")
    embedding_dim: int = Field(256, ge=8)
    dsp: bool = Field(True, description="the domain-specific branch (off: the 'DSH' ablation)")
    domain_loss: Literal["occ", "grl", "none"] = Field("occ", description="one-class L_DS (Eq. 5), GRL, or none")
    attn3: Literal["none", "1sum"] = Field(
        "none", description="ADFL's type I spatial + channel attention after backbone stage 3 (ADFL: '1sum')"
    )
    init_from: Path | None = Field(
        None, description="a training checkpoint (last.pt) whose trunk starts this run, e.g. an ADFL run's (with attn3: 1sum)"
    )


class LossConfig(_Strict):
    ds: float = Field(1.0, ge=0)
    reid_s: float = Field(1.0, ge=0)
    reid_t: float = Field(1.0, ge=0)
    dsp: float = Field(1.0, ge=0)
    orth: float = Field(1.0, ge=0, description="0 is the 'without orthogonality' ablation")
    target: Literal["weighted", "soft", "hard"] = Field(
        "weighted", description="weighted CE (DAAM Eq. 8), soft labels (DAAL Eq. 5), or plain CE (w/o weights)"
    )


class ArnConfig(_Strict):
    """ARN Eq. 5: L = L_cls + ctrs L_ctrs + rec L_rec + diff L_diff (+ mmd, the authors' code only)."""

    ctrs: float = Field(0.01, ge=0, description="alpha, the contrastive loss weight (Eq. 2)")
    rec: float = Field(2.0, ge=0, description="beta, the reconstruction loss weight (Eq. 3); 0: the 'w/o L_rec' ablation")
    diff: float = Field(1500.0, ge=0, description="gamma, the difference (orthogonality) loss weight (Eq. 4)")
    mmd: float = Field(0.0, ge=0, description="MMD of source and target e_c (the authors' code: 0.1; not in the paper)")
    margin: float = Field(2.0, gt=0, description="contrastive margin m (the paper gives none; the authors' code 2)")
    private: bool = Field(True, description="the private encoders E_S / E_T (off: the 'w/o E_S, E_T' ablation)")
    reconstruct: Literal["features", "image"] = Field(
        "features", description="what D_C rebuilds: the feature map X (the paper, L2) or the image (the authors' code, L1)"
    )


class AdflConfig(_Strict):
    af_dim: int = Field(1024, ge=8, description="AF3 convolutional block width, concatenated with the backbone feature")
    softmax: float = Field(1.0, ge=0, description="identity cross-entropy weight (on the BN neck)")
    triplet: float = Field(1.0, ge=0, description="batch-hard triplet weight (on the BN neck)")
    margin: float = Field(0.3, gt=0, description="triplet margin")
    flip_test: bool = Field(True, description="the embedding averages the image and its mirror image (also exported)")


class TcapConfig(_Strict):
    """The tracklet- and camera-aware method (`trainer.methods.tcap`): every switch is one ablation."""

    tracklets: bool = Field(True, description="cluster tracklets (the tracker's (camera, track)); off: every crop alone")
    split: bool = Field(True, description="cut tracklets where their appearance changes by more than the site's "
                        "co-occurring pairs laid end to end show a swap does (tracker swaps); pieces of at least min_crops")
    cannot_link: bool = Field(True, description="never cluster two tracklets that co-occur (one camera, overlapping frames)")
    eps: Literal["tracklets", "profile", "percentile"] = Field(
        "tracklets", description="DBSCAN eps: the distance that best separates two halves of one tracklet from "
        "co-occurring tracklets (the profile where the site has no such pairs), Otsu's threshold on the k-NN distance "
        "profile, or DAAL's clustering.p share"
    )
    eps_k: int = Field(5, ge=1, description="neighbours per tracklet in the eps profile")
    min_crops: int = Field(4, ge=1, description="DBSCAN min_samples, counted in crops (a long tracklet is a core point)")
    pool: Literal["avg", "gem"] = Field("gem", description="global pooling: average or generalised mean")
    gem_p: float = Field(3.0, ge=1, description="GeM's initial p (learnt)")
    neck: bool = Field(True, description="BN neck after pooling (BNNeck)")
    memory: float = Field(1.0, ge=0, description="cluster-memory InfoNCE weight (Cluster Contrast)")
    proxy_intra: float = Field(1.0, ge=0, description="intra-camera proxy loss weight (CAP)")
    proxy_inter: float = Field(0.5, ge=0, description="inter-camera proxy loss weight (CAP)")
    cooccur: float = Field(1.0, ge=0, description="tracklet constraint: margin to the centroids of co-occurring tracklets")
    cooccur_margin: float = Field(0.1, ge=0, description="cosine margin of the tracklet constraint")
    source_ce: float = Field(1.0, ge=0, description="labelled source identity cross-entropy weight")
    source_triplet: float = Field(1.0, ge=0, description="labelled source batch-hard triplet weight")
    triplet_margin: float = Field(0.3, gt=0)
    tau: float = Field(0.05, gt=0, description="cluster-memory temperature")
    proxy_tau: float = Field(0.07, gt=0, description="proxy temperature")
    hard_negatives: int = Field(50, ge=1, description="other-cluster proxies in the inter-camera loss")
    momentum: float = Field(0.2, ge=0, lt=1, description="memory update: m <- momentum m + (1 - momentum) f")


class EdaanConfig(_Strict):
    """EDAAN (`trainer.methods.edaan`): attention-guided translation of the source into the target's style + re-ID."""

    loss: Literal["quartet", "triplet"] = Field("quartet", description="the metric loss beside identity CE (Eq. 6 / 7)")
    attention: bool = Field(True, description="the attention masks (off: plain CycleGAN translation, the ablation)")
    end_to_end: bool = Field(True, description="re-ID gradients reach the generator (off: Table V's two-stage 'DAAN')")
    gen_channels: int = Field(64, ge=4, le=256, description="CycleGAN ResNet generator width (ngf)")
    gen_blocks: int = Field(9, ge=1, le=16, description="residual blocks in each generator (CycleGAN: 9)")
    disc_channels: int = Field(64, ge=4, le=256, description="PatchGAN width (ndf)")
    disc_layers: int = Field(3, ge=1, le=5, description="PatchGAN stride-2 layers (3: the 70x70 PatchGAN)")
    attn_channels: int = Field(32, ge=4, le=256, description="attention network width")
    gan: float = Field(1.0, ge=0, description="LSGAN adversarial weight, each direction")
    cycle: float = Field(10.0, ge=0, description="cycle-consistency L1 weight (Eq. 4; Eq. 9 omits it, CycleGAN's 10)")
    attn: float = Field(10.0, ge=0, description="lambda_attn, attention-consistency L1 weight (Eq. 5)")
    id: float = Field(1.0, ge=0, description="lambda_id, identity cross-entropy weight (Eq. 8)")
    metric: float = Field(1.0, ge=0, description="lambda_quartet, weight of the quartet (or triplet) loss")
    margin1: float = Field(0.3, gt=0, description="tau_1: the triplet / first quartet hinge margin")
    margin2: float = Field(0.15, gt=0, description="tau_2: the second quartet hinge margin (intra vs other pairs)")
    attention_epochs: int = Field(30, ge=0, description="the attention networks train in the first this many epochs only")
    whole_image_epochs: int = Field(30, ge=0, description="the discriminators see whole images this long, masked after")
    pool: int = Field(50, ge=0, le=1000, description="image pool of generated images per discriminator (0: none)")
    sheet: int = Field(8, ge=1, le=64, description="source crops in the translation sheet (translation.png)")


class ClusteringConfig(_Strict):
    method: Literal["kmeans", "dbscan"] = "kmeans"
    k: int = Field(650, ge=2, description="k-means clusters K")
    k1: int = Field(20, ge=1, description="k-reciprocal neighbours")
    k2: int = Field(6, ge=1, description="local query expansion")
    p: float = Field(0.0016, gt=0, le=1, description="DBSCAN eps = mean of the smallest p share of distances")
    min_samples: int = Field(4, ge=1, description="DBSCAN minimum cluster size M")
    epsilon: float = Field(0.9, ge=0, le=1, description="DAAL soft-label floor for the assigned cluster (Eq. 4)")


class ScheduleConfig(_Strict):
    epochs: int = Field(ge=0)
    lr: float = Field(gt=0)
    backbone_lr_mult: float = Field(1.0, gt=0, description="backbone lr = lr x this")
    milestones: list[int] = Field(default_factory=list, description="epochs where lr is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    freeze_backbone_epochs: int = Field(0, ge=0, description="the backbone's lr is 0 for this many first epochs (ADFL: 5)")
    decay_epochs: int = Field(0, ge=0, description="the lr decays linearly towards 0 over the last this many epochs "
                              "(CycleGAN, EDAAN: 100 of 200)")

    @model_validator(mode="after")
    def _decay_within_epochs(self):
        if self.decay_epochs > self.epochs:
            raise ValueError(f"decay_epochs ({self.decay_epochs}) is more than epochs ({self.epochs})")
        return self


class AdaptConfig(ScheduleConfig):
    iterations: int = Field(7, ge=0, description="Algorithm 1 iterations at most")
    nmi_stop: float = Field(0.95, gt=0, le=1, description="stop when NMI of consecutive pseudo labels exceeds this")
    iteration_lr_decay: float = Field(
        1.0, gt=0, le=1, description="iteration i (from 1) trains at lr x this^(i-1): below 1, a later iteration moves "
        "the model less, so one bad re-clustering late in the run costs less of what the earlier ones learnt"
    )
    epoch_of: Literal["larger", "target"] = Field(
        "larger", description="an adaptation epoch is one pass over the larger of source and target (the papers' "
        "Market/Duke sizes), or over the target alone, so a large labelled source does not multiply the passes over a "
        "small site"
    )
    ema: float = Field(
        0.0, ge=0, lt=1, description="0: off. Else the momentum of a mean teacher (MMT's mean net): an exponential "
        "moving average of the network's weights after every adaptation step, which clusters the target, is scored "
        "and is exported, so one noisy iteration does not become the deployed model"
    )
    domain_bn: bool = Field(
        False, description="BatchNorm normalises source and target rows apart, only the target's move its running "
        "statistics, and those are re-estimated on the target before each target step (DSBN / AdaBN): the export "
        "normalises by the site's statistics, not a mixture with the source's"
    )


class SamplerConfig(_Strict):
    p: int = Field(16, ge=1, description="identities (clusters) per domain per batch")
    k: int = Field(4, ge=1, description="images per identity")


class OptimConfig(_Strict):
    kind: Literal["sgd", "adam"] = Field("sgd", description="Nesterov SGD (DAAM, DAAL, ARN) or Adam (ADFL)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1")
    weight_decay: float = Field(5e-4, ge=0)


class TrainConfig(_Strict):
    method: str = Field("daam", description="adaptation method: a key of crossview.trainer.methods.METHODS")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="model name; versions are name-<date>")
    output_dir: Path = Path("runs/train")
    cache_dir: Path = Field(Path("runs/cache"), description="crops cut from MOT sequences are kept here")
    seed: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    workers: int = Field(2, ge=0)
    source: SourceConfig
    target: TargetConfig
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    clustering: ClusteringConfig = ClusteringConfig()
    arn: ArnConfig = ArnConfig()
    adfl: AdflConfig = AdflConfig()
    tcap: TcapConfig = TcapConfig()
    edaan: EdaanConfig = EdaanConfig()
    sampler: SamplerConfig = SamplerConfig()
    optim: OptimConfig = OptimConfig()
    pretrain: ScheduleConfig = ScheduleConfig(epochs=60, lr=1e-3, milestones=[40])
    adapt: AdaptConfig = AdaptConfig(epochs=200, lr=1e-3, milestones=[20, 120])
    eval_batch_size: int = Field(64, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        """The chosen method's paper settings under the file's own keys: `method: daal` alone is DAAL."""
        name = data.get("method", "daam") if isinstance(data, dict) else None
        method = _methods().get(name) if isinstance(name, str) else None  # an unknown one: `_known_method` says so
        return overlay(method.defaults, data) if method is not None else data

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in _methods():
            raise ValueError(f"unknown method {v!r}; choose one of {', '.join(_methods())}")
        return v


def _methods() -> dict:
    # Imported on use: the methods import torch, which reading this module should not need.
    from crossview.trainer.methods import METHODS

    return METHODS


def overlay(base: dict, changes: dict) -> dict:
    """`base` with `changes` laid over it, section by section: nested dicts merge, any other value replaces."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = overlay(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


TRAIN_PATH_KEYS = [("output_dir",), ("cache_dir",), ("source", "root"), ("source", "also", "*", "root"),
                   ("target", "root"), ("target", "evaluate_on", "root"), ("model", "init_from")]


def load_train_config(path: str | Path, defaults: dict | None = None) -> TrainConfig:
    return load_config(path, TrainConfig, TRAIN_PATH_KEYS, defaults)


__all__ = ["ConfigError", "TrainConfig", "load_train_config", "overlay"]
