"""Which AWS API operations a LabCloud service's code calls, found by reading it.

``service_calls(package)`` parses the repository's own packages and follows, from
every top-level definition of ``package`` (``user_api``, ``worker_api``,
``worker_runner``), the first-party functions and classes it refers to (imports,
re-exports through ``__init__``, imports inside functions, module-level code of the
modules it reaches; a class reached brings all its methods). A module that a service
imports but never uses a definition of (a package ``__init__`` re-exporting S3
storage to a runner that only needs path helpers) adds nothing. In the code reached
it finds:

- ``<client>.<operation>(...)``: an operation of an AWS service whose client the
  repository creates (``boto3.client("s3")`` or ``.client("s3", ...)`` anywhere in its
  packages), called as boto3 calls operations: keywords only, every parameter the
  operation requires among them (or ``**arguments``) — which tells
  ``client.get_secret_value(SecretId=arn)`` from pydantic's
  ``SecretStr.get_secret_value()``. The receiver must not be ``self``/``cls``, and
  when the repository itself defines a function of that name, the receiver must be a
  variable or attribute that the same module assigns a client to (``.client(...)``,
  or a call of a first-party function returning one);
- ``getattr(<client>, name)(...)``: every operation name among the string
  constants assigned to ``name`` in the same definition;
- ``get_paginator("<operation>")`` and ``get_waiter("<waiter>")`` (the operation
  the waiter polls);
- ``generate_presigned_url("<operation>", ...)`` / ``ClientMethod="<operation>"``
  and ``generate_presigned_post(...)`` (``put_object``): whoever uses the URL acts
  with the signer's permissions;
- boto3's managed transfers (``upload_fileobj``, ``download_fileobj``, ``copy``...),
  as the operations they make.

``iam_actions`` maps the operations to IAM actions: ``<prefix>:<OperationName>``
except S3's own names (``list_objects_v2`` is ``s3:ListBucket``, multipart uploads
are ``s3:PutObject``...); operations that AWS serves without a signature (Cognito's
``initiate_auth``, ``sign_up``) need none.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import botocore.session
from botocore import xform_name

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("labcloud", "user_api", "worker_api", "worker_runner")

# S3 operations whose IAM action is not their name (AWS's "Actions, resources and
# condition keys for Amazon S3"). An S3 operation missing here fails the test
# instead of being guessed.
S3_ACTIONS: dict[str, tuple[str, ...]] = {
    "abort_multipart_upload": ("s3:AbortMultipartUpload",),
    "complete_multipart_upload": ("s3:PutObject",),
    "copy_object": ("s3:GetObject", "s3:PutObject"),
    "create_bucket": ("s3:CreateBucket",),
    "create_multipart_upload": ("s3:PutObject",),
    "delete_object": ("s3:DeleteObject",),
    "delete_objects": ("s3:DeleteObject",),
    "get_bucket_location": ("s3:GetBucketLocation",),
    "get_object": ("s3:GetObject",),
    "get_object_attributes": ("s3:GetObject", "s3:GetObjectAttributes"),
    "head_bucket": ("s3:ListBucket",),
    "head_object": ("s3:GetObject",),
    "list_multipart_uploads": ("s3:ListBucketMultipartUploads",),
    "list_objects": ("s3:ListBucket",),
    "list_objects_v2": ("s3:ListBucket",),
    "list_parts": ("s3:ListMultipartUploadParts",),
    "put_object": ("s3:PutObject",),
    "upload_part": ("s3:PutObject",),
    "upload_part_copy": ("s3:GetObject", "s3:PutObject"),
}
# boto3's managed transfers (S3Transfer) and the operations they make.
MANAGED_TRANSFERS: dict[str, tuple[str, ...]] = {
    "upload_file": ("put_object", "create_multipart_upload", "upload_part"),
    "upload_fileobj": ("put_object", "create_multipart_upload", "upload_part"),
    "download_file": ("head_object", "get_object"),
    "download_fileobj": ("head_object", "get_object"),
    "copy": ("head_object", "copy_object", "create_multipart_upload", "upload_part_copy"),
}
# Actions AWS authorizes besides an operation's own. Batch checks batch:TagResource
# when a SubmitJob carries tags ("tagging on creation"); the runner tags every job.
ALSO_AUTHORIZED: dict[tuple[str, str], tuple[str, ...]] = {
    ("batch", "submit_job"): ("batch:TagResource",),
}
PRESIGNED_POST_OPERATION = "put_object"
_SELF_NAMES = frozenset({"self", "cls"})


@dataclass(frozen=True, order=True)
class Call:
    """One AWS operation called at ``where`` (``path:line``)."""

    service: str
    operation: str
    where: str


@cache
def _botocore() -> botocore.session.Session:
    return botocore.session.get_session()


@cache
def operations(service: str) -> frozenset[str]:
    """The snake_case operation names of an AWS service, as boto3's clients name them."""
    model = _botocore().get_service_model(service)
    return frozenset(xform_name(name) for name in model.operation_names)


def iam_actions(service: str, operation: str) -> tuple[str, ...]:
    """The IAM actions an operation needs; () for one AWS serves unsigned."""
    model = _botocore().get_service_model(service)
    names = {xform_name(name): name for name in model.operation_names}
    if operation not in names:
        raise KeyError(f"{service} has no operation {operation}")
    if model.operation_model(names[operation]).auth_type == "none":
        return ()
    if service == "s3":
        if operation not in S3_ACTIONS:
            raise KeyError(f"no IAM mapping for s3 operation {operation}: add it to S3_ACTIONS")
        return S3_ACTIONS[operation]
    return (
        f"{model.signing_name}:{names[operation]}",
        *ALSO_AUTHORIZED.get((service, operation), ()),
    )


# -- the repository's modules ---------------------------------------------------------


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    # Top-level definitions (functions, classes, assigned names) by name.
    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    # Module-level statements that are no definition (run when the module is imported).
    body: list[ast.stmt] = field(default_factory=list)
    # Names this module binds by import: name -> (module, attribute or None).
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    # Names and attributes assigned a ``.client(...)`` result in this module.
    client_names: set[str] = field(default_factory=set)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_relative(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    is_package = module.path.name == "__init__.py"
    base = package if is_package else package[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _import_bindings(module: Module, node: ast.stmt) -> Iterator[tuple[str, str, str | None]]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.asname:
                yield alias.asname, alias.name, None
            else:
                top = alias.name.split(".")[0]
                yield top, top, None
    elif isinstance(node, ast.ImportFrom):
        source = _resolve_relative(module, node)
        for alias in node.names:
            yield alias.asname or alias.name, source, alias.name


def _is_client_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "client"
    )


def _callee_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def _makes_client(node: ast.AST, factories: frozenset[str]) -> bool:
    return _is_client_call(node) or (isinstance(node, ast.Call) and _callee_name(node) in factories)


def _target_names(target: ast.expr) -> Iterator[str]:
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Attribute):
        yield target.attr


@dataclass(frozen=True)
class Repository:
    """Where the code is: a folder and its first-party packages."""

    root: Path = REPO_ROOT
    packages: tuple[str, ...] = FIRST_PARTY


@cache
def repository_modules(repo: Repository) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for package in repo.packages:
        for path in sorted((repo.root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            module = Module(_module_name(repo.root, path), path, tree)
            for node in tree.body:
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    module.definitions[node.name] = node
                elif isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
                    for name in names:
                        module.definitions[name] = node
                    if not names:
                        module.body.append(node)
                elif not isinstance(node, ast.Import | ast.ImportFrom):
                    module.body.append(node)
            for any_node in ast.walk(tree):
                if isinstance(any_node, ast.Import | ast.ImportFrom):
                    for local, source, attribute in _import_bindings(module, any_node):
                        module.imports.setdefault(local, (source, attribute))
            modules[module.name] = module
    factories = frozenset(
        node.name
        for module in modules.values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.FunctionDef)
        and any(
            isinstance(inner, ast.Return)
            and inner.value is not None
            and _is_client_call(inner.value)
            for inner in ast.walk(node)
        )
    )
    for module in modules.values():
        for assignment in ast.walk(module.tree):
            if (
                isinstance(assignment, ast.Assign | ast.AnnAssign)
                and assignment.value is not None
                and _makes_client(assignment.value, factories)
            ):
                targets = (
                    assignment.targets
                    if isinstance(assignment, ast.Assign)
                    else [assignment.target]
                )
                for target in targets:
                    module.client_names.update(_target_names(target))
    return modules


@cache
def first_party_function_names(repo: Repository) -> frozenset[str]:
    return frozenset(
        node.name
        for module in repository_modules(repo).values()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


@cache
def client_services(repo: Repository) -> frozenset[str]:
    """The AWS services the repository makes clients of (``.client("s3", ...)``).

    Raises ``ValueError`` where the code makes AWS calls this module cannot read: a
    client whose service is not a literal, or a boto3 resource (``boto3.resource``)."""
    found: set[str] = set()
    for module in repository_modules(repo).values():
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            where = f"{module.path.relative_to(repo.root)}:{node.lineno}"
            if node.func.attr == "resource":
                raise ValueError(f"{where}: boto3 resources are not scanned; use a client")
            if node.func.attr != "client":
                continue
            argument = node.args[0] if node.args else None
            for keyword in node.keywords:
                if keyword.arg == "service_name":
                    argument = keyword.value
            service = _string(argument)
            if service is None:
                raise ValueError(f"{where}: a client whose service is not a literal")
            found.add(service)
    return frozenset(found)


# -- what a service reaches ------------------------------------------------------------

Symbol = tuple[str, str | None]  # (module, definition); None: the module's own body


def _lookup(modules: dict[str, Module], module_name: str, name: str) -> Iterator[Symbol]:
    """The symbols ``module_name.name`` stands for, following re-exports."""
    module = modules.get(module_name)
    if module is None:
        # A submodule imported as a name (``from labcloud import secrets``).
        if f"{module_name}.{name}" in modules:
            yield (f"{module_name}.{name}", None)
        return
    yield (module_name, None)
    if name in module.definitions:
        yield (module_name, name)
    elif name in module.imports:
        yield from _follow(modules, module.imports[name])
    elif f"{module_name}.{name}" in modules:
        yield (f"{module_name}.{name}", None)


def _follow(modules: dict[str, Module], binding: tuple[str, str | None]) -> Iterator[Symbol]:
    source, attribute = binding
    if attribute is None:
        if source in modules:
            yield (source, None)
        return
    yield from _lookup(modules, source, attribute)


def _referenced(
    modules: dict[str, Module], module: Module, nodes: Iterable[ast.AST]
) -> set[Symbol]:
    found: set[Symbol] = set()
    for root in nodes:
        for node in ast.walk(root):
            if isinstance(node, ast.Name):
                if node.id in module.definitions:
                    found.add((module.name, node.id))
                elif node.id in module.imports:
                    found.update(_follow(modules, module.imports[node.id]))
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                binding = module.imports.get(node.value.id)
                if binding is not None:
                    source, attribute = binding
                    target = source if attribute is None else f"{source}.{attribute}"
                    if target in modules:
                        found.update(_lookup(modules, target, node.attr))
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for _, source, attribute in _import_bindings(module, node):
                    if attribute is None and source in modules:
                        found.add((source, None))
    return found


def reached(package: str, repo: Repository) -> set[Symbol]:
    """Every first-party definition reachable from the package's definitions."""
    modules = repository_modules(repo)
    pending: list[Symbol] = [
        (name, definition)
        for name, module in modules.items()
        if name == package or name.startswith(f"{package}.")
        for definition in [None, *module.definitions]
    ]
    seen: set[Symbol] = set()
    while pending:
        symbol = pending.pop()
        if symbol in seen:
            continue
        seen.add(symbol)
        module_name, definition = symbol
        module = modules[module_name]
        nodes: list[ast.AST] = (
            list(module.body) if definition is None else [module.definitions[definition]]
        )
        found = _referenced(modules, module, nodes)
        # A module whose definition is used has run its own body, and its package's.
        parts = module_name.split(".")
        found.update((".".join(parts[:i]), None) for i in range(1, len(parts) + 1))
        pending.extend(s for s in found if s not in seen and s[0] in modules)
    return seen


def _string(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _receiver_name(receiver: ast.expr) -> str | None:
    if isinstance(receiver, ast.Name):
        return receiver.id
    if isinstance(receiver, ast.Attribute):
        return receiver.attr
    return None


def _called_like_an_operation(node: ast.Call, service: str, operation: str) -> bool:
    """Keywords only, with every parameter the operation requires (or ``**kwargs``)."""
    if node.args:
        return False
    given = {keyword.arg for keyword in node.keywords}
    if None in given:
        return True
    model = _botocore().get_service_model(service)
    name = next(n for n in model.operation_names if xform_name(n) == operation)
    shape = model.operation_model(name).input_shape
    required = set(shape.required_members) if shape is not None else set()
    return required <= given


def _assigned_strings(root: ast.AST, name: str) -> Iterator[str]:
    for node in ast.walk(root):
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            for constant in ast.walk(node.value):
                if isinstance(constant, ast.Constant) and isinstance(constant.value, str):
                    yield constant.value


def _calls_in(
    repo: Repository, module: Module, root: ast.AST, services: frozenset[str]
) -> Iterator[Call]:
    own_functions = first_party_function_names(repo)
    relative = module.path.relative_to(repo.root)
    for node in ast.walk(root):
        if not isinstance(node, ast.Call):
            continue
        where = f"{relative}:{node.lineno}"
        # getattr(client, name)(...): the operation is chosen at run time.
        if (
            isinstance(node.func, ast.Call)
            and isinstance(node.func.func, ast.Name)
            and node.func.func.id == "getattr"
            and len(node.func.args) >= 2
            and _receiver_name(node.func.args[0]) in module.client_names
        ):
            chosen = node.func.args[1]
            names = (
                [chosen.value]
                if isinstance(chosen, ast.Constant) and isinstance(chosen.value, str)
                else list(_assigned_strings(root, chosen.id))
                if isinstance(chosen, ast.Name)
                else []
            )
            if not names:
                raise ValueError(f"{where}: getattr on a client with an unknown operation")
            for operation in names:
                yield from _owned(services, operation, where)
            continue
        if not isinstance(node.func, ast.Attribute):
            continue
        receiver, method = node.func.value, node.func.attr
        if isinstance(receiver, ast.Name) and receiver.id in _SELF_NAMES:
            continue
        known_client = _receiver_name(receiver) in module.client_names
        if method in ("get_paginator", "get_waiter") and node.args:
            name = _string(node.args[0])
            if name is not None and method == "get_paginator":
                yield from _owned(services, name, where)
            elif name is not None:
                for operation in _waiter_operations(services, name):
                    yield from _owned(services, operation, where)
        elif method == "generate_presigned_url":
            client_method = node.args[0] if node.args else None
            for keyword in node.keywords:
                if keyword.arg == "ClientMethod":
                    client_method = keyword.value
            name = _string(client_method)
            if name is None:
                raise ValueError(f"{where}: generate_presigned_url without a literal method")
            yield from _owned(services, name, where)
        elif method == "generate_presigned_post":
            yield from _owned(services, PRESIGNED_POST_OPERATION, where)
        elif method in MANAGED_TRANSFERS and (known_client or method not in own_functions):
            # ``copy`` is too common a name to count on a receiver not known as a client.
            if method != "copy" or known_client:
                for operation in MANAGED_TRANSFERS[method]:
                    yield from _owned(services, operation, where)
        elif known_client or method not in own_functions:
            for call in _owned(services, method, where):
                if _called_like_an_operation(node, call.service, call.operation):
                    yield call


def _owned(services: frozenset[str], operation: str, where: str) -> Iterator[Call]:
    """``operation`` as a call of the one service (among ``services``) that has it."""
    owners = sorted(service for service in services if operation in operations(service))
    if len(owners) > 1:
        raise ValueError(f"{where}: {operation} is an operation of {owners}")
    if owners:
        yield Call(owners[0], operation, where)


def _waiter_operations(services: frozenset[str], waiter: str) -> Iterator[str]:
    for service in services:
        try:
            model = _botocore().get_waiter_model(service)
        except Exception:  # a service without waiters
            continue
        if waiter in {xform_name(name) for name in model.waiter_names}:
            yield xform_name(model.get_waiter(_camel(model, waiter)).operation)


def _camel(model: object, waiter: str) -> str:
    names: Iterable[str] = getattr(model, "waiter_names", ())
    return next(name for name in names if xform_name(name) == waiter)


def service_calls(package: str, repo: Repository | None = None) -> set[Call]:
    """The AWS operations the code of ``package`` (and what it uses) calls."""
    repo = repo or Repository()
    modules = repository_modules(repo)
    services = client_services(repo)
    calls: set[Call] = set()
    for module_name, definition in reached(package, repo):
        module = modules[module_name]
        roots: list[ast.AST] = (
            list(module.body) if definition is None else [module.definitions[definition]]
        )
        for root in roots:
            calls.update(_calls_in(repo, module, root, services))
    return calls


def required_actions(calls: Iterable[Call]) -> dict[str, set[str]]:
    """IAM action -> where the code needs it."""
    needed: dict[str, set[str]] = {}
    for call in calls:
        for action in iam_actions(call.service, call.operation):
            needed.setdefault(action, set()).add(f"{call.operation} at {call.where}")
    return needed
