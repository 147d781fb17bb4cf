"""Packaging: the top-level folders installed inside the `sddusr_engine` package.

The repository keeps `kernels/`, `weights/`, `assets/` and `cli.py` at the top level, where a
reader looks for them; installed, they are `sddusr_engine.kernels`, `sddusr_engine.pretrained`,
`sddusr_engine.assets` and the module `sddusr_engine.cli`, so no bare `kernels` or `cli` module
collides with another project's. Folders map through `package_dir`; the one module, `cli.py`, is
copied by `build_py` (setuptools maps folders, not single files). An editable install reaches
`cli.py` through the same `package_dir` entry. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CLI = "sddusr_engine.cli"
MAPPED = {
    "sddusr_engine.kernels": "kernels",
    "sddusr_engine.pretrained": "weights",
    "sddusr_engine.assets": "assets",
    CLI: "cli",  # the module cli.py (an editable install resolves `cli` + ".py")
}


class BuildPy(build_py):
    """`build_py` that installs the top-level cli.py as the module sddusr_engine/cli.py."""

    def check_package(self, package, package_dir):
        return None if package == CLI else super().check_package(package, package_dir)

    def find_package_modules(self, package, package_dir):
        return [] if package == CLI else super().find_package_modules(package, package_dir)

    def build_packages(self):
        super().build_packages()
        self.build_module("cli", "cli.py", "sddusr_engine")

    def get_outputs(self, include_bytecode=True):
        cli = self.get_module_outfile(self.build_lib, ["sddusr_engine"], "cli")
        return [*super().get_outputs(include_bytecode), cli]


setup(
    packages=[*find_packages(include=["sddusr_engine", "sddusr_engine.*"]), *MAPPED],
    package_dir=MAPPED,
    package_data={
        "sddusr_engine": ["report.css", "report.js"],  # inlined into the HTML report
        "sddusr_engine.pretrained": ["*.safetensors", "*.md"],
        "sddusr_engine.assets": ["sample/*"],
    },
    cmdclass={"build_py": BuildPy},
)
