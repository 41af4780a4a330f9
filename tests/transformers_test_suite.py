"""
Transformers' own common test files (tests/test_modeling_common.py and its siblings) of the installed transformers
version, put on `sys.path` as the package `tests`, for `test_transformers_common.py`.

They come from the transformers sdist on the package index (the wheel has no tests), extracted once into
`.cache/transformers-tests/<version>/` of the project (git-ignored; `CAVMAE_TRANSFORMERS_TESTS` sets another place).
The sdist lacks three sub-packages the common files import a name from; small stand-ins are written for them:
`tests/generation/test_utils.py` (`GenerationTesterMixin`, used only in `issubclass` checks: CAV-MAE cannot
generate), `tests/exporters/test_export.py` (`ExportTesterMixin`, whose tests are all `@slow` upstream) and
`tests/utils/test_configuration_utils.py` (`config_common_kwargs`, the dict `ConfigTester` checks).
"""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FILES = (
    "test_modeling_common.py",
    "test_configuration_common.py",
    "test_feature_extraction_common.py",
    "test_sequence_feature_extraction_common.py",
    "test_pipeline_mixin.py",
)
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["BertModel"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


def suite_dir() -> Path:
    default = PROJECT_ROOT / ".cache" / "transformers-tests" / transformers.__version__
    return Path(os.environ.get("CAVMAE_TRANSFORMERS_TESTS", default))


def ensure_on_path() -> Path:
    """Extract the files if needed, put their folder first on `sys.path`; returns it."""
    root = suite_dir()
    if not (root / "tests" / FILES[0]).is_file():
        _extract(root)
    sys.path.insert(0, str(root))
    return root


def _extract(root: Path):
    version = transformers.__version__
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*command, f"transformers=={version}", "-d", download], capture_output=True, text=True, timeout=600
        )
        archives = list(Path(download).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"Could not download the transformers {version} sdist for its common tests "
                f"({result.stderr.strip()[-500:]}). Put its tests/ files into {root}/tests or set "
                "CAVMAE_TRANSFORMERS_TESTS to a folder that has them."
            )
        package = root / "tests"
        package.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as archive:
            for name in FILES:
                try:
                    member = archive.extractfile(f"transformers-{version}/tests/{name}")
                except KeyError:  # a file this version does not have; the first three are needed
                    if name in FILES[:3]:
                        raise
                    continue
                (package / name).write_bytes(member.read())
    for relative, text in {"__init__.py": "", **STAND_INS}.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(f"# stand-in written by cavmae-hf's tests/transformers_test_suite.py\n{text}")
