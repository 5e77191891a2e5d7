from .batched import batched_generate
from .candidate_generator import DreamCandidateGenerator
from .engine import DraftTree
from .hook import install, uninstall
from .kv_cache import compact_cache
from .options import DreamDecodingOptions
from .tree import tree_generate, verify_tree

__all__ = ["DraftTree", "DreamDecodingOptions", "batched_generate", "DreamCandidateGenerator", "compact_cache", "install", "tree_generate", "uninstall", "verify_tree"]
