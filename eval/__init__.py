"""Offline evaluation: the official LaMP metrics and the scripts that apply them."""
