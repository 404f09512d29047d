"""dvc.yaml against the code: each stage runs its own script, and depends on exactly the library modules
that script imports (directly or through other modules), so editing any code a stage runs re-runs it, and
editing code it does not run leaves it cached."""
import ast
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vaelab import data, handoff
from vaelab.saved_model import load_vae
from vaelab.stages import read_history, read_snapshots

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "vaelab"


def _imported_modules(path: Path) -> set[str]:
    """Names of the vaelab modules `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vaelab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vaelab":
            names.add(node.module)
            if node.module == "vaelab":  # `from vaelab import config` imports a module
                names |= {f"vaelab.{alias.name}" for alias in node.names if (LIBRARY / f"{alias.name}.py").exists()}
    return names


def _module_file(name: str) -> Path:
    parts = name.split(".")[1:]
    return LIBRARY.joinpath(*parts).with_suffix(".py") if parts else LIBRARY / "__init__.py"


def library_closure(script: Path) -> set[str]:
    """Repository paths of every vaelab file that running `script` executes (the package's __init__ too)."""
    seen, todo = set(), _imported_modules(script)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= {"vaelab"} | _imported_modules(_module_file(name))
    return {_module_file(name).relative_to(ROOT).as_posix() for name in seen}


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _script(stage: dict) -> str:
    words = stage["cmd"].split()
    return words[words.index("python") + 1]


def test_stages_map_one_to_one_onto_pipeline_scripts():
    scripts = {name: _script(stage) for name, stage in _stages().items()}
    assert scripts == {path.stem: f"pipeline/{path.name}" for path in (ROOT / "pipeline").glob("*.py")}
    for name, stage in _stages().items():
        assert scripts[name] in stage["deps"], f"stage {name} does not depend on its own script"


def test_each_stage_runs_the_library_beside_it_not_the_installed_one(tmp_path):
    """A queued experiment runs in a copy of the workspace; its stages must import that copy's src/, the code
    DVC hashed when it was queued, not the editable install that follows the workspace's later edits."""
    copy = tmp_path / "queued-copy"
    for folder in ("pipeline", "src"):
        shutil.copytree(ROOT / folder, copy / folder)
    (copy / "src" / "vaelab" / "__init__.py").write_text('raise SystemExit("the copy\'s own library")\n')
    for name, stage in _stages().items():
        result = subprocess.run(stage["cmd"], shell=True, cwd=copy, capture_output=True, text=True)
        assert (result.returncode, result.stderr.strip()) == (1, "the copy's own library"), name


def test_each_stage_depends_on_exactly_the_library_code_it_runs():
    for name, stage in _stages().items():
        script = _script(stage)
        declared = {dep for dep in stage["deps"] if dep.startswith("src/")}
        assert declared == library_closure(ROOT / script), f"stage {name}: deps in dvc.yaml"


def test_the_closure_follows_imports_through_other_modules():
    # train.py imports training, which imports backprop: the training maths must re-run train
    assert "src/vaelab/backprop.py" in library_closure(ROOT / "pipeline" / "train.py")
    assert "src/vaelab/backprop.py" not in library_closure(ROOT / "pipeline" / "prepare.py")


READERS = {  # each stage input the stages read, and how
    "data/prepared/train.pt": lambda path: data.load_split(path.parent, "train"),
    "models/vae.pt": load_vae,
    "models/snapshots.pt": read_snapshots,
    "models/run.json": lambda path: handoff.read_run_id(path, required=True),
    "reports/history.csv": read_history,
}


def _written_by(path: str) -> tuple[str, bool]:
    """The stage in dvc.yaml whose output is `path` or a folder above it, and whether DVC caches that output."""
    for name, stage in _stages().items():
        for out in stage.get("outs", []):
            out_path, settings = next(iter(out.items())) if isinstance(out, dict) else (out, {})
            if path == out_path or path.startswith(out_path.rstrip("/") + "/"):
                return name, settings.get("cache", True)
    raise AssertionError(f"no stage in dvc.yaml writes {path}")


@pytest.mark.parametrize("path", READERS)
def test_a_missing_input_names_the_cure_that_dvc_yaml_allows(tmp_path, monkeypatch, path):
    """`dvc checkout` restores only what DVC caches: an output with cache: false is made again by its stage."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DamagedInput) as error:
        READERS[path](Path(path))
    stage, cached = _written_by(path)
    assert str(error.value).startswith(f"{path} not found; ")
    assert f"dvc repro {stage} makes it" in str(error.value)
    assert (f"dvc checkout {path} restores it" in str(error.value)) == cached
