"""Workload registry: name -> data + model + loss (output distribution) + eval metric + target.

A workload fixes everything about a cell except the optimizer: the data set (real files, the
generated CURVES set, or synthetic tensors of the same shapes for timing-only runs), the network,
the output distribution whose NLL is the loss, and the eval metric with the target value that
defines time-to-target (AlgoPerf's headline metric).

Targets are kfacbench's choices, not the papers' (K-FAC's experiments report curves, not targets).
Each workload states where its target comes from (``target_note``, shown by ``kfacbench list``):
measured with kfacbench where the data is available here, otherwise taken from the literature and
marked provisional until a measured run replaces it.

The GPU-scale workloads (:data:`GPU_SCALE`: ResNet-50 and ViT-S/16 at ImageNet's shape, GPT-2
small) have no reader for their real data (ImageNet, OpenWebText): they run on synthetic data of
their shapes, for timing and memory. Each has a ``_mini`` twin built by the same code at a size
a CPU test can step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from kfacbench.core.problem import Distribution
from kfacbench.data import Splits
from kfacbench.data.cifar import cifar10_splits
from kfacbench.data.curves import load_curves
from kfacbench.data.faces import load_faces
from kfacbench.data.idx import mnist_autoencoder_splits, mnist_classification_splits
from kfacbench.data.synthetic import synthetic_splits
from kfacbench.data.text import VOCAB, python_stdlib_splits
from kfacbench.errors import KfacbenchError
from kfacbench.workloads.nets import cifar_resnet, deep_autoencoder
from kfacbench.workloads.resnet import RESNET50, imagenet_resnet
from kfacbench.workloads.transformer import byte_gpt
from kfacbench.workloads.vit import vision_transformer

DataMode = Literal["real", "synthetic"]
Metric = Literal["recon_error", "accuracy", "bits_per_byte", "nats_per_token"]
LANGUAGE_METRICS = ("bits_per_byte", "nats_per_token")
"""The metrics of language models, whose examples are token sequences."""


@dataclass(frozen=True)
class Workload:
    """One benchmark problem.

    Attributes:
        name: registry name used in suites.
        summary: one line for ``kfacbench list``.
        input_shape: shape of one example.
        distribution: output distribution (the loss is its NLL).
        metric: ``recon_error`` (mean over examples of the summed squared error of the predicted
            pixels, as reported by Hinton & Salakhutdinov 2006; lower is better), ``accuracy``
            (higher is better), ``bits_per_byte`` (a byte-level language model's next-byte NLL
            in bits; lower is better) or ``nats_per_token`` (a language model's next-token NLL
            in nats, the log of its perplexity; lower is better).
        target: eval-metric value that counts as reached for time-to-target.
        build_model: ``build_model(generator)`` -> a freshly initialised network.
        load_real: ``load_real(data_dir, cache_dir)`` -> the real (or generated) data.
        synthetic_sizes: (train, test) sizes of the synthetic data mode.
        target_note: where the target value comes from.
        num_classes: classes for classification workloads, the vocabulary of a language model
            (0 for autoencoders).
        origin: where it comes from: ``kfacbench``, or a plugin (:mod:`kfacbench.plugins`).
    """

    name: str
    summary: str
    input_shape: tuple[int, ...]
    distribution: Distribution
    metric: Metric
    target: float
    build_model: Callable[[torch.Generator], nn.Module]
    load_real: Callable[[Path | None, Path | None], Splits]
    synthetic_sizes: tuple[int, int]
    target_note: str
    num_classes: int = 0
    origin: str = "kfacbench"

    @property
    def higher_is_better(self) -> bool:
        """Whether larger metric values are better (accuracy) or smaller (errors)."""
        return self.metric == "accuracy"

    def reached(self, value: float) -> bool:
        """Whether an eval-metric value meets the target."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def load_data(
        self, mode: DataMode, data_dir: Path | None = None, cache_dir: Path | None = None
    ) -> Splits:
        """The workload's data in ``mode`` (synthetic data is seeded and the same every time)."""
        if mode == "real":
            return self.load_real(data_dir, cache_dir)
        n_train, n_test = self.synthetic_sizes
        target: Literal["input", "classes", "tokens"] = "classes" if self.num_classes else "input"
        if self.metric in LANGUAGE_METRICS:
            target = "tokens"
        return synthetic_splits(
            self.input_shape,
            target=target,
            n_train=n_train,
            n_test=n_test,
            seed=0,
            num_classes=self.num_classes or 10,
        )


def _autoencoder(sizes: tuple[int, ...]) -> Callable[[torch.Generator], nn.Module]:
    return lambda gen: deep_autoencoder(sizes, init="sparse", generator=gen)


def _resnet(depth: int, in_channels: int) -> Callable[[torch.Generator], nn.Module]:
    def build(gen: torch.Generator) -> nn.Module:
        # torch.nn.init draws from the global RNG; seed it from the cell's generator.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            return cifar_resnet(depth, in_channels=in_channels, num_classes=10)

    return build


def _curves(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    return load_curves(cache_dir, seed=0)


def _faces(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    return load_faces(data_dir, cache_dir, seed=0)


def _mnist_ae(dataset: Literal["mnist", "fashion_mnist"]) -> Callable[..., Splits]:
    return lambda data_dir, cache_dir: mnist_autoencoder_splits(dataset, data_dir)


def _fashion_classes(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    return mnist_classification_splits("fashion_mnist", data_dir)


def _cifar(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    return cifar10_splits(data_dir)


TEXT_CONTEXT = 128
"""Bytes per example of ``text_gpt`` (its context length)."""


def _stdlib_text(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    return python_stdlib_splits(TEXT_CONTEXT)


def _gpt(gen: torch.Generator) -> nn.Module:
    return byte_gpt(context=TEXT_CONTEXT, width=256, depth=4, heads=4, generator=gen)


def _no_reader(name: str, what: str) -> Callable[[Path | None, Path | None], Splits]:
    def load(data_dir: Path | None, cache_dir: Path | None) -> Splits:
        raise KfacbenchError(
            f'workload {name!r}: kfacbench has no reader for {what} files; use data = "synthetic"'
        )

    return load


def _imagenet_resnet(
    width: int, num_classes: int, blocks: tuple[int, ...] = RESNET50
) -> Callable[[torch.Generator], nn.Module]:
    return lambda gen: imagenet_resnet(blocks, width=width, num_classes=num_classes, generator=gen)


def _vit(
    image_size: int, width: int, depth: int, heads: int, num_classes: int
) -> Callable[[torch.Generator], nn.Module]:
    return lambda gen: vision_transformer(
        image_size=image_size,
        width=width,
        depth=depth,
        heads=heads,
        num_classes=num_classes,
        generator=gen,
    )


def _gpt2(
    context: int, width: int, depth: int, heads: int, vocab: int
) -> Callable[[torch.Generator], nn.Module]:
    return lambda gen: byte_gpt(
        context=context,
        width=width,
        depth=depth,
        heads=heads,
        vocab=vocab,
        tie_head=True,
        generator=gen,
    )


GPT2_VOCAB = 50_257
"""GPT-2's BPE vocabulary (Radford et al. 2019, §2.2)."""

GPU_SCALE_SIZES = (2_560, 256)
"""(train, test) synthetic examples of the GPU-scale workloads: 2,560 ImageNet-shaped images are
1.5 GiB of float32 (602 KB each), which sits on any 16 GB GPU beside ResNet-50 at batch 256, and
ten batches of 256 per epoch; the minis use 512 and 64."""

GPU_SCALE = {
    "imagenet_resnet50": "imagenet_resnet50_mini",
    "imagenet_vit_s16": "imagenet_vit_mini",
    "gpt2_small": "gpt2_mini",
}
"""The GPU-sized workloads and their CPU-sized twins (the same code at a smaller size): tests
build the former for their parameter counts and step only the latter."""

MNIST_AE = (784, 1000, 500, 250, 30)
WIDTHS = (256, 1024, 4096)
"""Hidden widths W of the ``wide_ae_W`` family (784-W-W/2-30, mirrored): the axis on which SKFAC's
Woodbury inverse wins (batch m ≪ W) or falls back to K-FAC's (m ≥ W)."""


def _wide_autoencoder(width: int) -> Workload:
    return Workload(
        name=f"wide_ae_{width}",
        summary=f"Fashion-MNIST autoencoder 784-{width}-{width // 2}-30 mirrored (width sweeps)",
        input_shape=(784,),
        distribution="bernoulli",
        metric="recon_error",
        target=15.0,
        target_note="provisional: for step-time sweeps over width (synthetic data)",
        build_model=_autoencoder((784, width, width // 2, 30)),
        load_real=_mnist_ae("fashion_mnist"),
        synthetic_sizes=(60_000, 10_000),
    )


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            name="curves_ae",
            summary="CURVES deep autoencoder 784-400-200-100-50-25-6 (generated data, BCE)",
            input_shape=(784,),
            distribution="bernoulli",
            metric="recon_error",
            target=10.0,
            target_note="measured: SGD (lr 0.01, momentum 0.9, batch 100) needs ~7,000 steps",
            build_model=_autoencoder((784, 400, 200, 100, 50, 25, 6)),
            load_real=_curves,
            synthetic_sizes=(20_000, 10_000),
        ),
        Workload(
            name="mnist_ae",
            summary="MNIST deep autoencoder 784-1000-500-250-30 (official IDX files, BCE)",
            input_shape=(784,),
            distribution="bernoulli",
            metric="recon_error",
            target=10.0,
            target_note="provisional: not yet measured (no MNIST training files offline)",
            build_model=_autoencoder(MNIST_AE),
            load_real=_mnist_ae("mnist"),
            synthetic_sizes=(60_000, 10_000),
        ),
        Workload(
            name="fashion_mnist_ae",
            summary="Fashion-MNIST deep autoencoder 784-1000-500-250-30 (IDX files, BCE)",
            input_shape=(784,),
            distribution="bernoulli",
            metric="recon_error",
            target=15.0,
            target_note="provisional: not yet measured",
            build_model=_autoencoder(MNIST_AE),
            load_real=_mnist_ae("fashion_mnist"),
            synthetic_sizes=(60_000, 10_000),
        ),
        Workload(
            name="faces_ae",
            summary="FACES deep autoencoder 625-2000-1000-500-30 (from Olivetti, squared error)",
            input_shape=(625,),
            distribution="gaussian",
            metric="recon_error",
            target=150.0,
            target_note="provisional: not yet measured",
            build_model=_autoencoder((625, 2000, 1000, 500, 30)),
            load_real=_faces,
            synthetic_sizes=(103_500, 41_400),
        ),
        Workload(
            name="cifar10_resnet20",
            summary="ResNet-20 (He et al. 2016) on CIFAR-10 (official python batches)",
            input_shape=(3, 32, 32),
            distribution="categorical",
            metric="accuracy",
            target=0.91,
            target_note="He et al. 2016 report 91.25% test accuracy for ResNet-20",
            build_model=_resnet(20, 3),
            load_real=_cifar,
            synthetic_sizes=(50_000, 10_000),
            num_classes=10,
        ),
        Workload(
            name="cifar10_resnet32",
            summary="ResNet-32 (He et al. 2016) on CIFAR-10 (official python batches)",
            input_shape=(3, 32, 32),
            distribution="categorical",
            metric="accuracy",
            target=0.92,
            target_note="He et al. 2016 report 92.49% test accuracy for ResNet-32",
            build_model=_resnet(32, 3),
            load_real=_cifar,
            synthetic_sizes=(50_000, 10_000),
            num_classes=10,
        ),
        Workload(
            name="fashion_mnist_resnet20",
            summary="ResNet-20 on Fashion-MNIST (1x28x28, official IDX files)",
            input_shape=(1, 28, 28),
            distribution="categorical",
            metric="accuracy",
            target=0.92,
            target_note="provisional: not yet measured",
            build_model=_resnet(20, 1),
            load_real=_fashion_classes,
            synthetic_sizes=(60_000, 10_000),
            num_classes=10,
        ),
        Workload(
            name="text_gpt",
            summary="byte-level GPT (4 layers, width 256, 4 heads, context 128) on the Python"
            " standard library's source",
            input_shape=(TEXT_CONTEXT,),
            distribution="categorical",
            metric="bits_per_byte",
            target=3.15,
            target_note="calibrated with AdamW on 2 CPU cores (text_gpt_adamw: lr 3e-4 of"
            " 1e-4..1e-2, β₂ 0.95, wd 0.1, batch 32): 3.133 bits/byte at 118 s of its 240 s,"
            " rounded up; a CPU-scale target",
            build_model=_gpt,
            load_real=_stdlib_text,
            synthetic_sizes=(50_000, 5_000),
            num_classes=VOCAB,
        ),
        *(_wide_autoencoder(width) for width in WIDTHS),
        Workload(
            name="imagenet_resnet50",
            summary="ResNet-50 (He et al. 2016; torchvision's v1.5, bottlenecks, BatchNorm) at"
            " ImageNet-1k's shape, 3x224x224, 1,000 classes (25.6M parameters)",
            input_shape=(3, 224, 224),
            distribution="categorical",
            metric="accuracy",
            target=0.759,
            target_note="provisional: torchvision's ResNet-50 (v1) top-1 of 76.13%, rounded"
            " down; no ImageNet reader, synthetic data only",
            build_model=_imagenet_resnet(64, 1000),
            load_real=_no_reader("imagenet_resnet50", "ImageNet"),
            synthetic_sizes=GPU_SCALE_SIZES,
            num_classes=1000,
        ),
        Workload(
            name="imagenet_resnet50_mini",
            summary="imagenet_resnet50's code at CPU size: 3x64x64, 100 classes, width 8",
            input_shape=(3, 64, 64),
            distribution="categorical",
            metric="accuracy",
            target=0.5,
            target_note="provisional: a test-sized twin, synthetic data only",
            build_model=_imagenet_resnet(8, 100),
            load_real=_no_reader("imagenet_resnet50_mini", "ImageNet"),
            synthetic_sizes=(512, 64),
            num_classes=100,
        ),
        Workload(
            name="imagenet_vit_s16",
            summary="ViT-S/16 (DeiT-S: 12 pre-norm blocks, width 384, 6 heads, MLP 1,536) at"
            " ImageNet-1k's shape, 3x224x224, 1,000 classes (22.1M parameters)",
            input_shape=(3, 224, 224),
            distribution="categorical",
            metric="accuracy",
            target=0.79,
            target_note="provisional: DeiT-S's 79.8% top-1 (Touvron et al. 2021), rounded down;"
            " no ImageNet reader, synthetic data only",
            build_model=_vit(224, 384, 12, 6, 1000),
            load_real=_no_reader("imagenet_vit_s16", "ImageNet"),
            synthetic_sizes=GPU_SCALE_SIZES,
            num_classes=1000,
        ),
        Workload(
            name="imagenet_vit_mini",
            summary="imagenet_vit_s16's code at CPU size: 3x64x64 (16 patches), 100 classes,"
            " 2 blocks of width 64, 2 heads",
            input_shape=(3, 64, 64),
            distribution="categorical",
            metric="accuracy",
            target=0.5,
            target_note="provisional: a test-sized twin, synthetic data only",
            build_model=_vit(64, 64, 2, 2, 100),
            load_real=_no_reader("imagenet_vit_mini", "ImageNet"),
            synthetic_sizes=(512, 64),
            num_classes=100,
        ),
        Workload(
            name="gpt2_small",
            summary="GPT-2 small (12 layers, width 768, 12 heads, context 1,024, 50,257-token"
            " vocabulary, output layer tied to the token embedding; 124.4M parameters)",
            input_shape=(1024,),
            distribution="categorical",
            metric="nats_per_token",
            target=3.3,
            target_note="provisional: nanoGPT's GPT-2 small reaches about 2.85 nats/token on"
            " OpenWebText at the end of training; 3.3 marks early training; no OpenWebText"
            " reader, synthetic data only",
            build_model=_gpt2(1024, 768, 12, 12, GPT2_VOCAB),
            load_real=_no_reader("gpt2_small", "OpenWebText"),
            synthetic_sizes=GPU_SCALE_SIZES,
            num_classes=GPT2_VOCAB,
        ),
        Workload(
            name="gpt2_mini",
            summary="gpt2_small's code at CPU size: 2 layers, width 128, 4 heads, context 64,"
            " vocabulary 1,024, tied output layer",
            input_shape=(64,),
            distribution="categorical",
            metric="nats_per_token",
            target=5.0,
            target_note="provisional: a test-sized twin, synthetic data only",
            build_model=_gpt2(64, 128, 2, 4, 1024),
            load_real=_no_reader("gpt2_mini", "OpenWebText"),
            synthetic_sizes=(512, 64),
            num_classes=1024,
        ),
    )
}

from kfacbench.workloads.scaling import scaling_workloads  # noqa: E402  (it needs Workload)

WORKLOADS.update((w.name, w) for w in scaling_workloads())


def get_workload(name: str) -> Workload:
    """The registered workload ``name``.

    Raises:
        KfacbenchError: unknown name (the message lists the known ones).
    """
    try:
        return WORKLOADS[name]
    except KeyError:
        known = ", ".join(WORKLOADS)
        raise KfacbenchError(f"unknown workload {name!r}; known: {known}") from None
