"""ggforge.runtime"""
