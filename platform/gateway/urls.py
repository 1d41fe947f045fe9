from django.urls import path, re_path

from gateway import views

app_name = "gateway"

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat_completions"),
    path("models", views.models, name="models"),
    # Anything else under /v1/ answers in OpenAI's error shape too.
    re_path(r"", views.unknown, name="unknown"),
]
