"""What serving needs from a calibration: the artifact's schema, the scores and the check."""

from guard.verdict.artifact import CalibrationArtifact, load_artifact, save_artifact
from guard.verdict.detector import Detector, Verdict, Verdicts

__all__ = [
    "CalibrationArtifact",
    "Detector",
    "Verdict",
    "Verdicts",
    "load_artifact",
    "save_artifact",
]
