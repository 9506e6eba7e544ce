"""Infer tasks of the app: the bundle's registration (``scripts.monailabel_task.RegistrationInferTask``)."""

from .registration import import_bundle, registration_task

__all__ = ["import_bundle", "registration_task"]
