"""Every public API of `hf_dream` has a docstring, and every `hf-dream` option has help text."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import pkgutil

import hf_dream
from hf_dream.cli import build_parser

SKIPPED_MODULES = ("hf_dream.__main__",)  # importing it runs the command line


def _public_modules() -> tuple[list, list[str]]:
    """The importable modules of `hf_dream`, and those skipped because an optional dependency is missing."""
    unavailable: list[str] = []

    def on_error(name: str) -> None:  # a subpackage that walk_packages could not import
        unavailable.append(name)

    modules = []
    for info in pkgutil.walk_packages(hf_dream.__path__, "hf_dream.", onerror=on_error):
        if info.name in SKIPPED_MODULES:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError as error:  # an optional dependency (e.g. a reference target's extras)
            unavailable.append(f"{info.name} ({error})")
    return modules, unavailable


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [name for name in vars(module) if not name.startswith("_")]


def _has_doc(obj) -> bool:
    return bool((getattr(obj, "__doc__", None) or "").strip())


def _class_has_doc(cls: type) -> bool:
    doc = (cls.__dict__.get("__doc__") or "").strip()
    # a dataclass without a docstring gets its signature as `__doc__`: that does not count
    generated = dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}(")
    return bool(doc) and not generated


def _methods(cls: type):
    """Public methods defined on `cls` itself: plain, class and static methods."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            yield name, value


def _documented_by_base(cls: type, name: str) -> bool:
    return any(_has_doc(getattr(base, name)) for base in cls.__mro__[1:] if callable(getattr(base, name, None)))


def test_every_public_class_function_and_method_has_a_docstring():
    modules, unavailable = _public_modules()
    assert modules, "no hf_dream module could be imported"
    missing = []
    for module in modules:
        for name in _public_names(module):
            obj = getattr(module, name, None)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or obj.__module__ != module.__name__:
                continue  # not a class/function, or re-exported from where it is defined (and checked)
            qualified = f"{module.__name__}.{name}"
            if inspect.isfunction(obj):
                if not _has_doc(obj):
                    missing.append(qualified)
                continue
            if not _class_has_doc(obj):
                missing.append(qualified)
            for method_name, method in _methods(obj):
                if not _has_doc(method) and not _documented_by_base(obj, method_name):
                    missing.append(f"{qualified}.{method_name}")
    assert not missing, (
        f"{len(missing)} public classes/functions/methods have no docstring:\n  " + "\n  ".join(missing)
        + (f"\n(not checked, optional dependencies missing: {', '.join(unavailable)})" if unavailable else "")
    )


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """`{name: subparser}` and `{name: help shown in the command list}` of `parser`'s subcommands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices), {choice.dest: choice.help for choice in action._choices_actions}


def _has_help(text: str | None) -> bool:
    return bool(text and text.strip() and text != argparse.SUPPRESS)


def test_every_subcommand_and_argument_has_help_text():
    subparsers, listed_help = _subcommands(build_parser())
    assert subparsers, "hf-dream has no subcommands"
    missing = []
    for name, subparser in subparsers.items():
        if not (_has_help(subparser.description) or _has_help(listed_help.get(name))):
            missing.append(f"hf-dream {name} (no description or help)")
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not _has_help(action.help):
                missing.append(f"hf-dream {name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help text:\n  " + "\n  ".join(missing)
