from .batched import batched_generate
from .candidate_generator import DreamCandidateGenerator
from .hook import install, uninstall
from .tree import DraftTree, compact_cache, tree_generate, verify_tree

__all__ = ["DraftTree", "batched_generate", "DreamCandidateGenerator", "compact_cache", "install", "tree_generate", "uninstall", "verify_tree"]
