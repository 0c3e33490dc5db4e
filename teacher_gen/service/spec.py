"""A job as the API takes it: `JobSpec`, a pydantic model built from `GenerateConfig`'s fields.

Every `potstill generate` setting is a field of the spec with the same type, default and help (an
old name of a setting still accepted), so a new setting of `GenerateConfig` is accepted by the
service (and shown in its OpenAPI schema) without any change here. `check_spec` then applies what pydantic cannot know:

- the settings of the loaded teacher (`LOAD_FIELDS`) may only repeat the service's values, and
  `trust_remote_code` can never be turned on by a job;
- `GenerateConfig.validate` (ranges, combinations), `top_k` within the teacher's vocabulary (and
  the service's `--max-top-k`, when given), a valid `writer_id`;
- locations: the path policy (paths.py) first, then a local prompt set must exist, be readable
  and have a known format, and a local store must be a folder or go where one can be created.

Each failure is a `SpecError` naming the field; the API answers it with 422.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, create_model

from potstill.settings import info_of
from potstill.store.errors import PotstillError
from potstill.teacher_gen.config import GenerateConfig
from potstill.teacher_gen.errors import GenerateError
from potstill.teacher_gen.service.paths import PathPolicy
from potstill.teacher_gen.service.settings import LOAD_FIELDS, ServeConfig, SpecError

# Settings a job cannot set: the service decides them.
NOT_IN_SPEC = ("progress", "executor", "ray_address", "num_actors", "gpus_per_actor")
__all__ = ["JobSpec", "SpecError", "check_spec", "given_settings", "job_config"]


def _spec_field(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """The spec's field of a setting: its type, default and help; an old name is still accepted."""
    try:
        TypeAdapter(hint)
    except Exception:  # a type pydantic cannot check: GenerateConfig.build still coerces and checks it
        hint = Any
    info = info_of(f)
    names = [f.name, *(a.lstrip("-").replace("-", "_") for a in info.aliases)]
    extra: dict[str, Any] = {"description": info.help}
    if len(names) > 1:
        extra["validation_alias"] = AliasChoices(*dict.fromkeys(names))
    if f.name == "prompts":
        return str, Field(min_length=1, description="Prompt set: absolute path on the server inside its read "
                                                    "roots, or a URL of a scheme it allows.")
    if f.name == "store":
        return str, Field(min_length=1, description="Output store: absolute path on the server inside its write "
                                                    "roots, or a URL of a scheme it allows.")
    if f.name in LOAD_FIELDS:
        return hint | None, Field(None, description=f"{info.help} Fixed by the service; may only repeat its value.")
    if f.default_factory is not dataclasses.MISSING:
        return hint, Field(default_factory=f.default_factory, **extra)
    return hint, Field(f.default, **extra)


def build_spec_model() -> type[BaseModel]:
    """The pydantic model of a job: one field per `GenerateConfig` setting (see the module doc)."""
    hints = typing.get_type_hints(GenerateConfig)
    fields = {
        f.name: _spec_field(f, hints[f.name])
        for f in dataclasses.fields(GenerateConfig)
        if f.name not in NOT_IN_SPEC
    }
    config = ConfigDict(extra="forbid", title="JobSpec")
    return create_model("JobSpec", __config__=config, __doc__=(
        "A generation job: `prompts`, `store` and any `potstill generate` setting (same names with "
        "'_', same defaults). Settings of the loaded teacher may only repeat the service's values."
    ), **fields)


JobSpec = build_spec_model()


def given_settings(spec: BaseModel) -> dict[str, Any]:
    """The settings the submitter actually gave (defaults left out, so they follow GenerateConfig)."""
    return spec.model_dump(exclude_unset=True)


def job_config(given: dict[str, Any], service: ServeConfig) -> GenerateConfig:
    """The `GenerateConfig` a job runs with: its settings, with the loaded teacher's (`LOAD_FIELDS`) on top."""
    values = {**given, **service.load_settings(), "progress": False}
    try:
        return GenerateConfig.build(**values)
    except GenerateError as e:
        field = _field_named_in(str(e))
        raise SpecError(field, str(e)) from None


def check_spec(given: dict[str, Any], service: ServeConfig, policy: PathPolicy, *,
               resolved_device: str | None = None, vocab_size: int | None = None) -> GenerateConfig:
    """Refuse what this service cannot or may not run (see the module doc); returns the job's config."""
    check_load_settings(given, service, resolved_device)
    config = job_config(given, service)
    if vocab_size is not None and config.top_k > vocab_size:
        raise SpecError("top_k", f"{config.top_k} is above the teacher's vocabulary size {vocab_size}")
    if service.max_top_k is not None and config.top_k > service.max_top_k:
        raise SpecError("top_k", f"{config.top_k} is above this service's --max-top-k {service.max_top_k}")
    if config.writer_id is not None:
        from potstill.store.commit import check_writer_id

        try:
            check_writer_id(config.writer_id)
        except PotstillError as e:
            raise SpecError("writer_id", str(e)) from None
    prompts = policy.prompts(config.prompts)
    if not is_url(prompts):
        _check_readable("prompts", config.prompts, prompts)
    store = policy.store(config.store)
    if not is_url(store):
        _check_writable("store", config.store, store)
    return config


def check_load_settings(given: dict[str, Any], service: ServeConfig, resolved_device: str | None = None) -> None:
    if given.get("trust_remote_code") and not service.trust_remote_code:
        raise SpecError("trust_remote_code",
                        "this service was started without --trust-remote-code; a job cannot turn it on")
    for name in LOAD_FIELDS:
        wanted = given.get(name)
        have = getattr(service, name)
        if wanted is None or name == "trust_remote_code" or wanted == have:
            continue
        if name == "teacher" and same_local_path(wanted, have):
            continue
        if name == "device" and wanted == resolved_device:
            continue
        raise SpecError(name, f"this service serves {name} {have!r}, the job asks for {wanted!r}; "
                              f"submit it to a service started with that {name}")


def same_local_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def is_url(location: str) -> bool:
    return "://" in location


def _check_readable(field: str, given: str, path: str) -> None:
    """A local prompt set (`path`, resolved inside the roots) exists, is readable and has a known format."""
    from potstill.teacher_gen.prompts import detect_format

    if not os.path.exists(path):
        raise SpecError(field, f"{given} does not exist on the server")
    access = os.R_OK | (os.X_OK if os.path.isdir(path) else 0)
    if not os.access(path, access):
        raise SpecError(field, f"{given} is not readable by the service")
    try:
        detect_format(path)
    except GenerateError as e:
        raise SpecError(field, str(e)) from None


def _check_writable(field: str, given: str, path: str) -> None:
    """A local store (`path`, resolved inside the roots) is a folder, or goes where one can be made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SpecError(field, f"{given} exists and is not a store folder")
    existing = path
    while not os.path.exists(existing):  # the store's folders are created by the run
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(field, f"{given}: {existing} is not a folder the service can write to")


def _field_named_in(message: str) -> str:
    """The setting a `GenerateConfig` error names ('--top-k must be ...' -> 'top_k')."""
    for word in message.replace(":", " ").split():
        if word.startswith("--"):
            return word[2:].replace("-", "_")
    return "spec"
