"""ggforge.tools"""
