"""Modules of the MONAI Label app (MONAI Label's sample-app layout: ``lib/infers`` holds the infer tasks)."""
