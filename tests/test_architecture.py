"""The package's shape, as docs/ARCHITECTURE.md states it: who may import whom, how big a module may
grow, and which facts are written in exactly one place. Read from the source with `ast`."""

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("common", "coordinator", "worker")
MAX_MODULE_LINES = 400

# What each part of the package may import from the others (beyond itself). common/ is the
# bottom: it never imports the processes that use it. Within common/, the math imports no
# format, and the wire knows nothing of the cluster YAML.
ALLOWED = {
    "common.model": {"common.errors", "common.model", "common.kernels"},
    "common.kernels": {"common.errors", "common.kernels"},
    # The reduce modes' names are a leaf module the wire's HELLO names; the exchanges themselves sit above.
    "common.wire": {"common.errors", "common.wire", "common.model", "common.exchange.modes"},
    "common.exchange": {"common.errors", "common.exchange", "common.wire", "common.model"},
    "common.formats": {"common.errors", "common.formats", "common.model", "common.kernels"},
    "common.cluster": {"common.errors", "common.cluster", "common.wire", "common.exchange", "common.formats",
                       "common.model"},
    "worker": {"common", "worker"},
    "coordinator": {"common", "coordinator"},
}
# The one place the coordinator may reach into worker/: the `llmtp worker` command starts one.
COORDINATOR_TO_WORKER = {"coordinator/commands/worker.py", "coordinator/cli.py"}


def package_modules():
    for top in PACKAGE_DIRS:
        yield from sorted((ROOT / top).rglob("*.py"))


def part_of(relative: str) -> str:
    parts = relative.split("/")
    if parts[0] == "common" and len(parts) > 2:
        return f"common.{parts[1]}"
    return parts[0] if parts[0] != "common" else "common." + parts[1].removesuffix(".py")


def llmtp_imports(path: Path) -> list[str]:
    """Dotted names (without the llmtp. prefix) of everything `path` imports from the package."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return [name.removeprefix("llmtp.") for name in names
            if name.startswith("llmtp.") or name.split(".")[0] in PACKAGE_DIRS]


def allowed(importer_part: str, imported: str) -> bool:
    for rule_part, targets in ALLOWED.items():
        if importer_part == rule_part or importer_part.startswith(rule_part + "."):
            return any(imported == target or imported.startswith(target + ".") for target in targets)
    return True  # common/__init__ and common/errors: imported by everything, import nothing


def test_no_upward_or_sideways_import():
    problems = []
    for path in package_modules():
        relative = path.relative_to(ROOT).as_posix()
        importer = part_of(relative)
        for imported in llmtp_imports(path):
            if imported.startswith("worker") and importer.startswith("coordinator"):
                if relative not in COORDINATOR_TO_WORKER:
                    problems.append(f"{relative} imports {imported}")
            elif not allowed(importer, imported):
                problems.append(f"{relative} ({importer}) imports {imported}")
    assert not problems, "\n".join(problems)


def test_no_module_over_the_size_limit():
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in package_modules()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "\n".join(long)


def string_constants(path: Path) -> list[ast.AST]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Set, ast.Tuple, ast.List))]


def test_reduce_modes_are_listed_in_one_module():
    """A collection literal holding two or more reduce-mode names is a second list of them."""
    modes = {"peers", "star", "shm"}
    listing = []
    for path in package_modules():
        for node in string_constants(path):
            values = {elt.value for elt in node.elts if isinstance(elt, ast.Constant)}
            if len(values & modes) >= 2:
                listing.append(path.relative_to(ROOT).as_posix())
    assert set(listing) <= {"common/exchange/modes.py"}, listing


def quantized_matrix_classes() -> dict[str, str]:
    """Class name -> its module, for every Matrix subclass but the float32 one."""
    classes = {}
    for path in package_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name != "F32Matrix":
                bases = {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
                if "Matrix" in bases:
                    classes[node.name] = path.relative_to(ROOT).as_posix()
    return classes


def test_quantized_matrix_types_are_inspected_only_in_their_own_module():
    classes = quantized_matrix_classes()
    assert classes, "no quantized Matrix type found: the check would pass vacuously"
    offenders = []
    for path in package_modules():
        relative = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                names |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                offenders += [f"{relative}:{node.lineno} {name}" for name in names
                              if name in classes and classes[name] != relative]
    assert not offenders, offenders
