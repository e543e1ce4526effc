"""Callbacks, one job each."""

from mpp.callbacks.ema import EMA
from mpp.callbacks.export import ExportSafetensors
from mpp.callbacks.final import FinalCheckpoint
from mpp.callbacks.finite import NonFiniteGuard
from mpp.callbacks.grad_norm import GradNorm
from mpp.callbacks.housekeeping import CheckpointHousekeeping
from mpp.callbacks.images import ImageLogger
from mpp.callbacks.layout_writer import LayoutWriter
from mpp.callbacks.preemption import PreemptionCheckpoint
from mpp.callbacks.progress import StepProgressBar
from mpp.callbacks.throughput import Throughput

__all__ = ["EMA", "CheckpointHousekeeping", "ExportSafetensors", "FinalCheckpoint", "GradNorm", "ImageLogger",
           "LayoutWriter", "NonFiniteGuard", "PreemptionCheckpoint", "StepProgressBar", "Throughput"]
