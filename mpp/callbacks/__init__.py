"""Callbacks, one job each."""

from mpp.callbacks.export import ExportSafetensors
from mpp.callbacks.grad_norm import GradNorm
from mpp.callbacks.images import ImageLogger
from mpp.callbacks.layout_writer import LayoutWriter
from mpp.callbacks.preemption import PreemptionCheckpoint
from mpp.callbacks.progress import StepProgressBar
from mpp.callbacks.throughput import Throughput

__all__ = ["ExportSafetensors", "GradNorm", "ImageLogger", "LayoutWriter", "PreemptionCheckpoint", "StepProgressBar",
           "Throughput"]
