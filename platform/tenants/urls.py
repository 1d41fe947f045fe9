"""Pages of tenants: a person's tenants, switching and leaving, invitation links."""

from django.urls import path

from tenants import views

app_name = "tenants"

urlpatterns = [
    path("tenants/", views.tenants_mine, name="mine"),
    path("operator/", views.operator_home, name="operator_home"),
    path("tenants/switch/", views.tenant_switch, name="switch"),
    path("tenants/leave/", views.tenant_leave, name="leave"),
    path("invite/<str:token>/", views.invitation_page, name="invitation"),
]
