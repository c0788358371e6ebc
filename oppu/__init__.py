"""OPPU: One PEFT Per User — reusable logic behind the stage scripts."""
