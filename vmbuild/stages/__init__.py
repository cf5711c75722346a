"""The build pipeline's stages, in the order :mod:`vmbuild.pipeline` runs them.

``base`` (minimal Debian disk, cached) → ``disk`` (partitions, filesystems and GRUB without
root) → ``packer`` (the app stage's template and the Packer subprocess) → ``playbook`` (what
Ansible applies) → ``provision`` (ansible-runner, run from Packer's shell-local step) →
``artifact`` (the ``.vmx`` writer and the ``.vmx``/``.vmdk`` lint) → ``validate`` (the boot
test). Each stage checks its inputs, does its work and cleans up after itself.
"""
