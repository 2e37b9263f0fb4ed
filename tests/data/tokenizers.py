"""placeholder"""
SHADOW = True
