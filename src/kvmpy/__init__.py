"""kvmpy: a virtual machine monitor for Linux/KVM, written in Python."""

__version__ = "0.1.0"
