"""Spec side: the deployment YAML read with positions, its schema check, sizes, families and SGLang flags."""
