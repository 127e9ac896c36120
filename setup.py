"""The two build steps pyproject.toml cannot state; everything else about the
package (metadata, dependencies, which packages) is in pyproject.toml.

- shoal's own gRPC API (protos/) is compiled with grpcio-tools into
  shoal/_gen: the generated code is not in git, so every build makes it.
- The demo mesh (examples/demo) goes into the wheel as shoal/demo/manifests:
  an installed shoal has no examples/ folder, and `shoal demo` needs one.

An editable install (`make`, `pip install -e .`) imports from the source tree,
so there the code is generated beside the sources and the demo mesh is read
where it is. setuptools runs both steps as sub-commands of `build`, with
`editable_mode` set for editable installs (its SubCommand protocol).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.warnings import InformationOnly

PROTOS = Path("protos")
DEMO_MESH = Path("examples", "demo")
PACKAGED_DEMO_MESH = Path("shoal", "demo", "manifests")

# The box setuptools prints after every editable install of a flat layout
# warns that a folder named like the package in the working directory may
# shadow it: in this checkout that folder is the package itself.
warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)


class _BuildStep(Command):
    """A sub-command of `build` that writes next to build_py's output."""

    user_options: list[tuple[str, str | None, str]] = []
    # Set by setuptools for an editable install, whose imports read the
    # source tree rather than build_lib.
    editable_mode = False
    build_lib: str | None

    def initialize_options(self) -> None:
        self.build_lib = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    @property
    def lib(self) -> Path:
        """build_py's output folder."""
        assert self.build_lib is not None, "used before finalize_options"
        return Path(self.build_lib)


class BuildProtos(_BuildStep):
    description = "compile protos/ with grpcio-tools into shoal/_gen"

    def _protos(self) -> list[Path]:
        return sorted(PROTOS.rglob("*.proto"))

    def _generated(self) -> list[Path]:
        """What protoc writes, relative to its output root."""
        return [
            p.relative_to(PROTOS).with_name(p.stem + suffix)
            for p in self._protos()
            for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")
        ]

    def run(self) -> None:
        out = Path(".") if self.editable_mode else self.lib
        out.mkdir(parents=True, exist_ok=True)
        # `-m grpc_tools.protoc` adds the well-known types to the include path.
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTOS}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--pyi_out={out}",
                *map(str, self._protos()),
            ],
            check=True,
        )

    def get_source_files(self) -> list[str]:
        return [str(p) for p in self._protos()]

    def get_outputs(self) -> list[str]:
        return [str(self.lib / g) for g in self._generated()]

    def get_output_mapping(self) -> dict[str, str]:
        if not self.editable_mode:
            return {}
        return {str(self.lib / g): str(g) for g in self._generated()}


class BuildDemoMesh(_BuildStep):
    description = "copy the demo mesh (examples/demo) into the package"

    def _copies(self) -> dict[str, str]:
        """Target in build_lib -> source."""
        return {
            str(self.lib / PACKAGED_DEMO_MESH / f.name): str(f)
            for f in sorted(DEMO_MESH.glob("*.yaml"))
        }

    def run(self) -> None:
        if self.editable_mode:
            return
        for target, source in self._copies().items():
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)

    def get_source_files(self) -> list[str]:
        return list(self._copies().values())

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else list(self._copies())

    def get_output_mapping(self) -> dict[str, str]:
        return {} if self.editable_mode else self._copies()


class Build(build):
    # After build_py, whose build_lib they write into.
    sub_commands = [*build.sub_commands, ("build_protos", None), ("build_demo_mesh", None)]


setup(cmdclass={"build": Build, "build_protos": BuildProtos, "build_demo_mesh": BuildDemoMesh})
