"""The one build step pyproject.toml cannot express: ``tucker_peft-autoload.pth`` at the root of the wheel, which pip
installs into site-packages, so that PEFT finds the Tucker method without ``import tucker_peft``
(``_tucker_peft_autoload.py``).  Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "tucker_peft-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
