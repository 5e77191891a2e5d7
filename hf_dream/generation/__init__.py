from .candidate_generator import DreamCandidateGenerator
from .hook import install, uninstall

__all__ = ["DreamCandidateGenerator", "install", "uninstall"]
