"""ggforge.convert"""
