"""TabConv Explorer: the Streamlit view over the tabconv library (which never imports it)."""
